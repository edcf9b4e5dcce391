"""ResNet generator and discriminator in the SNGAN style (Miyato et al. 2018, appendix B.4;
the Mimicry reimplementation), the strong default for image quality.

G: linear to a 4x4 map, up-sampling residual blocks (BatchNorm, or class-conditional BatchNorm),
BN-ReLU-conv to the image. D: a first "optimised" down-sampling block, down-sampling blocks to
4x4, one more block, ReLU, global sum pooling, a linear logit plus the projection term for
conditional models. Spectral normalisation of D is applied by the model factory. One departure
from the paper's CIFAR network: D always reduces to 4x4 (SNGAN's 32x32 D stops at 8x8), so one
rule serves every resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gan.models.layers import (
    ConditionalModule,
    apply_norm,
    batch_norm_2d,
    num_doublings,
    projection,
)

Tensor = torch.Tensor


def xavier_init(module: nn.Module) -> None:
    """Mimicry's SNGAN init: Xavier-uniform, gain sqrt(2) inside residual branches, 1 elsewhere."""
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            gain = 1.0 if name.endswith("shortcut") or "to_" in name else math.sqrt(2)
            nn.init.xavier_uniform_(layer.weight, gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class GBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus up-conv1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int):
        super().__init__()
        self.norm1 = batch_norm_2d(in_ch, num_classes)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = batch_norm_2d(out_ch, num_classes)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, labels: Tensor | None) -> Tensor:
        h = F.interpolate(F.relu(apply_norm(self.norm1, x, labels)), scale_factor=2)
        h = self.conv2(F.relu(apply_norm(self.norm2, self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """(ReLU)-conv3-ReLU-conv3-(avgpool), plus a conv1-(avgpool) shortcut, or the identity
    when the block keeps both channels and size.

    `first` is the optimised block that sees the image: no leading ReLU, shortcut pools first.
    """

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, first: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        learnable = first or downsample or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if learnable else nn.Identity()
        self.downsample = downsample
        self.first = first

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        skip = self.shortcut(self._pool(x)) if self.first else self._pool(self.shortcut(x))
        return h + skip


class ResNetGenerator(ConditionalModule):
    """z -> 4x4 map of width * 2^(n-1) channels -> n up-sampling blocks (halving) -> image."""

    def __init__(
        self,
        channels: int,
        resolution: int,
        z_dim: int = 128,
        width: int = 64,
        num_classes: int = 0,
    ):
        super().__init__(num_classes)
        self.z_dim = z_dim
        doublings = num_doublings(resolution, "ResNet")
        ch = width * 2 ** (doublings - 1)
        self.start_channels = ch
        self.to_map = nn.Linear(z_dim, 4 * 4 * ch)
        self.blocks = nn.ModuleList()
        for _ in range(doublings):
            out = max(ch // 2, width)
            self.blocks.append(GBlock(ch, out, num_classes))
            ch = out
        self.final_norm = nn.BatchNorm2d(ch)
        self.to_image = nn.Conv2d(ch, channels, 3, 1, 1)
        xavier_init(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, z.shape[0])
        x = self.to_map(z).view(z.shape[0], self.start_channels, 4, 4)
        for block in self.blocks:
            x = block(x, labels)
        return torch.tanh(self.to_image(F.relu(self.final_norm(x))))


class ResNetDiscriminator(ConditionalModule):
    """Image -> down-sampling blocks (doubling channels, at most 8 * width) to 4x4 -> logit."""

    def __init__(self, channels: int, resolution: int, width: int = 64, num_classes: int = 0):
        super().__init__(num_classes)
        doublings = num_doublings(resolution, "ResNet")
        ch = width
        blocks = [DBlock(channels, ch, downsample=True, first=True)]
        for _ in range(doublings - 1):
            out = min(ch * 2, width * 8)
            blocks.append(DBlock(ch, out, downsample=True))
            ch = out
        blocks.append(DBlock(ch, ch, downsample=False))
        self.blocks = nn.Sequential(*blocks)
        self.to_logit = nn.Linear(ch, 1)
        self.embed = nn.Embedding(num_classes, ch) if num_classes else None
        xavier_init(self)
        if self.embed is not None:
            nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, x.shape[0])
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.to_logit(h).squeeze(1) + projection(self.embed, h, labels)
