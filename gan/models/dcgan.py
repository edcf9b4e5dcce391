"""DCGAN (Radford et al. 2016): transposed-convolution generator, strided-convolution discriminator.

Layer for layer the networks of the PyTorch DCGAN tutorial at 64x64 (width 64: 3,576,704 and
2,765,568 parameters), generalised to 1 or 3 channels and any power-of-two resolution >= 8.
Conditional variants: class-conditional BatchNorm in G and a projection head in D (Miyato &
Koyama 2018).
"""

from __future__ import annotations

import torch
from torch import nn

from gan.models.layers import (
    ConditionalModule,
    apply_norm,
    batch_norm_2d,
    num_doublings,
    projection,
)

Tensor = torch.Tensor

D_NORMS = ("none", "batch", "instance", "layer")


def _d_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}; expected one of {D_NORMS}")


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and layer.affine:
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class DCGANGenerator(ConditionalModule):
    """z -> 4x4 map of width * 2^(n-1) channels -> n-1 doublings (halving channels) -> image."""

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
        doublings = num_doublings(resolution, "DCGAN")
        ch = width * 2 ** (doublings - 1)
        self.convs = nn.ModuleList([nn.ConvTranspose2d(z_dim, ch, 4, 1, 0, bias=False)])
        self.norms = nn.ModuleList([batch_norm_2d(ch, num_classes)])
        for _ in range(doublings - 1):
            self.convs.append(nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False))
            self.norms.append(batch_norm_2d(ch // 2, num_classes))
            ch //= 2
        self.to_image = nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False)
        dcgan_init(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, z.shape[0])
        x = z.view(z.shape[0], -1, 1, 1)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(apply_norm(norm, conv(x), labels))
        return torch.tanh(self.to_image(x))


class DCGANDiscriminator(ConditionalModule):
    """Image -> stride-2 convolutions (doubling channels) down to 4x4 -> one logit.

    `norm` normalises every convolution but the first: "batch" is the paper's choice; use
    "layer", "instance" or "none" with a gradient penalty, which assumes per-sample outputs.
    """

    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int = 64,
        num_classes: int = 0,
        norm: str = "batch",
    ):
        super().__init__(num_classes)
        doublings = num_doublings(resolution, "DCGAN")
        ch = width
        layers: list[nn.Module] = [nn.Conv2d(channels, ch, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        for _ in range(doublings - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=norm == "none"),
                _d_norm(norm, ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        self.features = nn.Sequential(*layers)
        self.to_logit = nn.Conv2d(ch, 1, 4, 1, 0, bias=False)
        self.embed = nn.Embedding(num_classes, ch) if num_classes else None
        dcgan_init(self)
        if self.embed is not None:  # the default N(0, 1) would swamp the unconditional logit
            nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, x.shape[0])
        h = self.features(x)
        logit = self.to_logit(h).flatten()
        return logit + projection(self.embed, h.sum(dim=(2, 3)), labels)
