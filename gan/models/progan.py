"""Progressive growing of GANs (Karras et al. 2018, "Progressive Growing of GANs for Improved
Quality, Stability, and Variation", ICLR; the networks of tkarras/progressive_growing_of_gans,
networks.py `G_paper` / `D_paper`, non-fused up/down-sampling).

- Equalized learning rate (section 4.1): every convolution and dense layer keeps N(0, 1)
  weights and multiplies them at run time by He's constant gain / sqrt(fan_in) (gain sqrt(2);
  1 for toRGB and D's last dense layer; sqrt(2)/4 for G's first dense layer, as the official
  code, to match the original Theano implementation). Biases start at zero.
- G (section 4.2): pixelwise feature normalisation of the latent and after every convolution,
  LeakyReLU 0.2, a 4x4 block (dense latent -> nf x 4 x 4 with one bias per channel, 3x3 conv),
  per doubling a block (nearest x2, two 3x3 convs), a 1x1 toRGB per resolution, linear output
  (not squashed: consumers clamp to [-1, 1], as they do for every family).
- D: a 1x1 fromRGB (LeakyReLU) per resolution, per doubling a block (two 3x3 convs, 2x2 average
  pooling), the 4x4 block: minibatch standard deviation (section 3; groups of 4 or the largest
  divisor of the batch up to 4, one appended feature map), 3x3 conv, dense 4x4 -> nf, dense ->
  1 logit. No normalisation layers.
- Class-conditional variant (num_classes > 0): G concatenates a learned class embedding (z_dim
  wide, N(0, 1) like z) to z before the first pixel norm; D adds the projection term
  <embed(y), features> (Miyato & Koyama 2018) to its logit, with an equalized embedding (a
  class-specific counterpart of the last dense layer: N(0, 1) scaled by 1 / sqrt(nf)).

Channel schedule (`progan_channels`): `width` channels at every resolution up to 32 px, halved
per doubling above, never below 8 (the paper's fmap_base 8192 / fmap_max 512 rule with
width = fmap_max: 512 channels up to 32 px, 16 at 1024 px).

Growth (section 3, figure 2): every resolution's layers exist from construction, so the
state_dict never changes shape across phases. `set_stage(resolution, alpha)` chooses what runs:
G outputs images at the current resolution, lerp(upsample(toRGB_prev(h)), toRGB_new(
block_new(h)), alpha) while fading; D takes images at the current resolution and fades its
input path the same way. At alpha 1 (and 0) the branch is taken, not the lerp, so the result is
bitwise the next (previous) network. A network starts at the final stage (final resolution,
alpha 1): built and used without a schedule it is a plain, full-resolution network.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gan.ema import unwrap
from gan.models.layers import ConditionalModule, projection
from gan.regularizers import apply_spectral_norm

Tensor = torch.Tensor

SQRT2 = math.sqrt(2)
LEAKY_SLOPE = 0.2
PIXEL_NORM_EPSILON = 1e-8
MBSTD_GROUP_SIZE = 4
MBSTD_EPSILON = 1e-8
FULL_WIDTH_UP_TO = 32  # resolutions up to this many pixels get `width` channels
MIN_CHANNELS = 8
MAX_RESOLUTION = 1024


def is_power_of_two(value) -> bool:
    """True for the ints 1, 2, 4, 8, ... (not for bools, floats or tensors)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value > 0
        and not (value & (value - 1))
    )


def check_alpha(alpha, where: str) -> float:
    """`alpha` as a float; ValueError naming `where` unless it is a real number in [0, 1]."""
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"{where}: alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def progan_channels(resolution: int, width: int) -> int:
    """Feature maps of the blocks at `resolution`: `width` up to 32 px, halved per doubling
    above, never below 8."""
    return max(MIN_CHANNELS, min(width, width * FULL_WIDTH_UP_TO // resolution))


def check_resolutions(resolution: int, start_resolution: int) -> None:
    """ValueError unless both are powers of two with 4 <= start <= final, 8 <= final <= 1024."""
    if not is_power_of_two(resolution) or not 8 <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"ProGAN needs a power-of-two resolution from 8 to {MAX_RESOLUTION}, got {resolution}"
        )
    if not is_power_of_two(start_resolution) or not 4 <= start_resolution <= resolution:
        raise ValueError(
            f"ProGAN's start_resolution must be a power of two from 4 to the final resolution "
            f"{resolution}, got {start_resolution}"
        )


def _doublings(low: int, high: int) -> list[int]:
    """The resolutions low, 2 low, ..., high."""
    return [low << k for k in range(high.bit_length() - low.bit_length() + 1)]


# -- equalized learning rate ---------------------------------------------------------------


def _runtime_scale(layer: nn.Module) -> float:
    """The He constant, or 1 once spectral normalisation reparametrises the weight: a
    normalised weight already has spectral norm 1, and scaling it by gain / sqrt(fan_in) as well
    shrinks every layer (measured: a 32 px D's logits fell from std 0.17 to 3e-15)."""
    return 1.0 if parametrize.is_parametrized(layer, "weight") else layer.scale


class EqualizedConv2d(nn.Conv2d):
    """A "same"-padded convolution whose N(0, 1) weight is scaled at run time by
    gain / sqrt(in_channels * k * k) (`self.scale`, a constant of the architecture; not
    applied to a spectrally normalised weight)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = SQRT2):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * _runtime_scale(self), self.bias)


class EqualizedLinear(nn.Linear):
    """A dense layer whose N(0, 1) weight is scaled at run time by gain / sqrt(in_features)
    (not applied to a spectrally normalised weight)."""

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = gain / math.sqrt(in_features)
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * _runtime_scale(self), self.bias)


class EqualizedEmbedding(nn.Embedding):
    """A class embedding used as a per-class dense layer: N(0, 1) rows scaled at run time by
    gain / sqrt(embedding_dim) (the projection term's <embed(y), h> is a dense layer h -> 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, gain: float = 1.0):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = gain / math.sqrt(embedding_dim)
        nn.init.normal_(self.weight)

    def forward(self, labels: Tensor) -> Tensor:
        return F.embedding(labels, self.weight * _runtime_scale(self))


# -- the paper's other layers ----------------------------------------------------------------


def pixel_norm(x: Tensor, epsilon: float = PIXEL_NORM_EPSILON) -> Tensor:
    """Pixelwise feature vector normalisation (section 4.2): x / sqrt(mean over channels of
    x^2 + epsilon), at every pixel (dim 1 holds the channels)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + epsilon)


def mbstd_group_size(batch: int, group_size: int = MBSTD_GROUP_SIZE) -> int:
    """The largest divisor of `batch` that is at most `group_size` (1 for an empty batch)."""
    return next((g for g in range(min(group_size, batch), 0, -1) if batch % g == 0), 1)


def minibatch_stddev(x: Tensor, group_size: int = MBSTD_GROUP_SIZE) -> Tensor:
    """Append one feature map: per group, the standard deviation of every feature over the
    group's samples, averaged over features and pixels (section 3). As the official code,
    sample i belongs to group i mod (N / G), the deviation is the biased one (mean of squares)
    plus 1e-8 under the square root, computed in float32."""
    n, c, h, w = x.shape
    g = mbstd_group_size(n, group_size)
    y = x.reshape(g, n // g, c, h, w).float()
    y = y - y.mean(dim=0, keepdim=True)
    y = torch.sqrt(y.square().mean(dim=0) + MBSTD_EPSILON).mean(dim=(1, 2, 3))  # (N / G,)
    y = y.to(x.dtype).reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


def _act(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


# -- generator ------------------------------------------------------------------------------


class GInputBlock(nn.Module):
    """4x4: dense latent -> nf x 4 x 4 (one bias per channel), LeakyReLU, pixel norm, then a 3x3
    conv, LeakyReLU, pixel norm. Its input is the pixel-normalised latent."""

    def __init__(self, latent_dim: int, channels: int):
        super().__init__()
        self.channels = channels
        self.dense = EqualizedLinear(latent_dim, channels * 16, gain=SQRT2 / 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.conv = EqualizedConv2d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dense(x).view(-1, self.channels, 4, 4) + self.bias.view(1, -1, 1, 1)
        x = pixel_norm(_act(x))
        return pixel_norm(_act(self.conv(x)))


class GUpBlock(nn.Module):
    """Nearest x2 upsampling, then two 3x3 convs, each followed by LeakyReLU and pixel norm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, out_channels, 3)
        self.conv1 = EqualizedConv2d(out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_norm(_act(self.conv0(_upsample(x))))
        return pixel_norm(_act(self.conv1(x)))


class _Growing(ConditionalModule):
    """The growth state both networks share: plain attributes (see `set_stage`)."""

    def __init__(self, resolution: int, start_resolution: int, num_classes: int):
        super().__init__(num_classes)
        check_resolutions(resolution, start_resolution)
        self.resolution = resolution  # the final resolution
        self.start_resolution = start_resolution
        self.current_resolution = resolution
        self.alpha = 1.0

    def set_stage(self, resolution: int, alpha: float) -> None:
        """Run at `resolution` (a power of two from start_resolution to the final one), fading
        the newest block in with weight `alpha` in [0, 1] (1: the block is fully in).

        The stage is kept as two plain attributes, not buffers: it survives copy.deepcopy (the
        EMA's copy) but is not in the state_dict (it is a function of the images shown, which
        the training loop checkpoints; a state_dict of fixed keys loads into any stage), and a
        Python number costs no device-to-host read when the forward branches on it. DDP does
        not broadcast it: every rank sets it from the same schedule. Call it on every copy
        (gan.progressive.apply_stage does G, D and the EMA generator at once)."""
        valid = is_power_of_two(resolution)
        if not valid or resolution not in _doublings(self.start_resolution, self.resolution):
            raise ValueError(
                f"{type(self).__name__}: stage resolution must be a power of two from "
                f"{self.start_resolution} to {self.resolution}, got {resolution}"
            )
        alpha = check_alpha(alpha, type(self).__name__)
        if resolution == self.start_resolution and alpha != 1:
            raise ValueError(
                f"{type(self).__name__}: alpha must be 1 at the start resolution "
                f"{resolution} (there is no lower resolution to fade from), got {alpha}"
            )
        self.current_resolution = int(resolution)
        self.alpha = alpha

    def extra_repr(self) -> str:
        return (
            f"resolution={self.resolution}, start_resolution={self.start_resolution}, "
            f"stage=({self.current_resolution}, alpha={self.alpha})"
        )


class ProGANGenerator(_Growing):
    """z (N, z_dim) [+ labels (N,)] -> images (N, channels, r, r) at the current resolution r.

    `growing=False` builds the generator of the final resolution only (no lower toRGB layers):
    what sampling and the registry need; `final_state_dict` gives the state_dict it loads.
    """

    def __init__(
        self,
        channels: int,
        resolution: int,
        z_dim: int = 128,
        width: int = 128,
        num_classes: int = 0,
        start_resolution: int = 4,
        growing: bool = True,
    ):
        super().__init__(resolution, start_resolution if growing else resolution, num_classes)
        self.channels, self.z_dim, self.width = channels, z_dim, width
        self.growing = growing
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None  # N(0, 1) as z
        latent_dim = z_dim * (2 if num_classes else 1)
        self.blocks = nn.ModuleDict({"4": GInputBlock(latent_dim, progan_channels(4, width))})
        for res in _doublings(8, resolution):
            low, high = progan_channels(res // 2, width), progan_channels(res, width)
            self.blocks[str(res)] = GUpBlock(low, high)
        self.to_rgb = nn.ModuleDict(
            {
                str(res): EqualizedConv2d(progan_channels(res, width), channels, 1, gain=1.0)
                for res in _doublings(self.start_resolution, resolution)
            }
        )

    def features(self, z: Tensor, labels: Tensor | None, resolution: int) -> Tensor:
        """The feature maps at `resolution` (before toRGB)."""
        x = z if self.embed is None else torch.cat([z, self.embed(labels)], dim=1)
        x = self.blocks["4"](pixel_norm(x))
        for res in _doublings(8, resolution) if resolution >= 8 else ():
            x = self.blocks[str(res)](x)
        return x

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, z.shape[0])
        res, alpha = self.current_resolution, self.alpha
        if alpha == 1:
            return self.to_rgb[str(res)](self.features(z, labels, res))
        h = self.features(z, labels, res // 2)
        previous = _upsample(self.to_rgb[str(res // 2)](h))
        if alpha == 0:
            return previous
        return torch.lerp(previous, self.to_rgb[str(res)](self.blocks[str(res)](h)), alpha)


def final_state_dict(generator: nn.Module) -> dict[str, Tensor]:
    """The state_dict of the non-growing generator (`growing=False`) of `generator`'s final
    resolution: `generator`'s own (DDP / torch.compile wrappers removed) without the toRGB
    layers of the lower resolutions. The two generators then agree bitwise at (final, 1)."""
    g = unwrap(generator)
    if not isinstance(g, ProGANGenerator):
        raise TypeError(f"final_state_dict needs a ProGANGenerator, got {type(g).__name__}")
    keep = f"to_rgb.{g.resolution}."
    return {
        k: v for k, v in g.state_dict().items() if not k.startswith("to_rgb.") or k.startswith(keep)
    }


def final_generator(generator: nn.Module) -> ProGANGenerator:
    """A new non-growing generator holding `generator`'s weights for the final resolution, in
    `generator`'s training mode and device (spectrally normalised if `generator` is): what
    save_generator / the registry export, as GeneratorSpec(...).build() would build it."""
    g = unwrap(generator)
    state = final_state_dict(g)
    out = ProGANGenerator(g.channels, g.resolution, g.z_dim, g.width, g.num_classes, growing=False)
    if any(parametrize.is_parametrized(m) for m in g.modules()):  # built with spectral_norm
        apply_spectral_norm(out)
    out.load_state_dict(state)
    return out.to(next(g.parameters()).device).train(g.training)


# -- discriminator --------------------------------------------------------------------------


class DDownBlock(nn.Module):
    """Two 3x3 convs (the second to the lower resolution's channels), LeakyReLU after each,
    then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = _act(self.conv1(_act(self.conv0(x))))
        return F.avg_pool2d(x, 2)


class DOutputBlock(nn.Module):
    """4x4: minibatch standard deviation, 3x3 conv, dense 4x4 -> nf (the features the projection
    term reads), dense -> 1 logit (gain 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = EqualizedConv2d(channels + 1, channels, 3)
        self.dense = EqualizedLinear(channels * 16, channels)
        self.to_logit = EqualizedLinear(channels, 1, gain=1.0)

    def features(self, x: Tensor) -> Tensor:
        """The (N, nf) features under the logit."""
        x = _act(self.conv(minibatch_stddev(x)))
        return _act(self.dense(x.flatten(start_dim=1)))


class ProGANDiscriminator(_Growing):
    """Images (N, channels, r, r) at the current resolution r [+ labels (N,)] -> logits (N,)."""

    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int = 128,
        num_classes: int = 0,
        start_resolution: int = 4,
    ):
        super().__init__(resolution, start_resolution, num_classes)
        self.from_rgb = nn.ModuleDict(
            {
                str(res): EqualizedConv2d(channels, progan_channels(res, width), 1)
                for res in _doublings(start_resolution, resolution)
            }
        )
        self.blocks = nn.ModuleDict(
            {
                str(res): DDownBlock(progan_channels(res, width), progan_channels(res // 2, width))
                for res in _doublings(8, resolution)
            }
        )
        nf = progan_channels(4, width)
        self.output = DOutputBlock(nf)
        self.embed = EqualizedEmbedding(num_classes, nf) if num_classes else None

    def _from_rgb(self, x: Tensor, resolution: int) -> Tensor:
        return _act(self.from_rgb[str(resolution)](x))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, x.shape[0])
        res, alpha = self.current_resolution, self.alpha
        if tuple(x.shape[-2:]) != (res, res):
            raise ValueError(
                f"{type(self).__name__} is at stage {res}x{res} but got images of shape "
                f"{tuple(x.shape)}: downsample the reals to the stage (gan.progressive.blend_reals)"
            )
        if alpha == 1:
            h, top = self._from_rgb(x, res), res
        else:
            h, top = self._from_rgb(F.avg_pool2d(x, 2), res // 2), res // 2
            if alpha != 0:
                h = torch.lerp(h, self.blocks[str(res)](self._from_rgb(x, res)), alpha)
        for r in reversed(_doublings(8, top)) if top >= 8 else ():
            h = self.blocks[str(r)](h)
        features = self.output.features(h)
        logit = self.output.to_logit(features).squeeze(1)
        return logit + projection(self.embed, features, labels)
