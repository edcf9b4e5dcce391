"""Vanilla GAN: fully connected generator and discriminator (Goodfellow et al. 2014).

With `num_classes > 0` both become the concatenation cGAN of Mirza & Osindero 2014: a one-hot
label is concatenated to the noise (G) and to the flattened sample (D).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gan.models.layers import ConditionalModule

Tensor = torch.Tensor


def _with_one_hot(x: Tensor, labels: Tensor | None, num_classes: int) -> Tensor:
    if num_classes == 0:
        return x
    return torch.cat([x, F.one_hot(labels, num_classes).to(x.dtype)], dim=1)


def _hidden_stack(
    in_features: int, width: int, depth: int, activation: Callable[[], nn.Module]
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), activation()]
    return nn.Sequential(*layers)


class MLPGenerator(ConditionalModule):
    """z (+ one-hot label) -> `depth` ReLU layers of `width` units -> a sample of `out_shape`.

    `tanh=True` bounds images to [-1, 1]; toy 2-D data uses an unbounded output.
    """

    def __init__(
        self,
        out_shape: tuple[int, ...],
        z_dim: int = 128,
        width: int = 256,
        depth: int = 3,
        num_classes: int = 0,
        tanh: bool = True,
    ):
        super().__init__(num_classes)
        self.out_shape = tuple(out_shape)
        self.z_dim = z_dim
        self.hidden = _hidden_stack(z_dim + num_classes, width, depth, nn.ReLU)
        self.out = nn.Linear(width, math.prod(self.out_shape))
        self.tanh = tanh

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, z.shape[0])
        x = self.out(self.hidden(_with_one_hot(z, labels, self.num_classes)))
        x = torch.tanh(x) if self.tanh else x
        return x.view(z.shape[0], *self.out_shape)


class MLPDiscriminator(ConditionalModule):
    """Flattened sample (+ one-hot label) -> `depth` LeakyReLU(0.2) layers -> one logit."""

    def __init__(
        self, in_shape: tuple[int, ...], width: int = 256, depth: int = 3, num_classes: int = 0
    ):
        super().__init__(num_classes)
        self.in_shape = tuple(in_shape)
        self.hidden = _hidden_stack(
            math.prod(self.in_shape) + num_classes, width, depth, partial(nn.LeakyReLU, 0.2)
        )
        self.out = nn.Linear(width, 1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, x.shape[0])
        h = _with_one_hot(x.flatten(start_dim=1), labels, self.num_classes)
        return self.out(self.hidden(h)).squeeze(1)
