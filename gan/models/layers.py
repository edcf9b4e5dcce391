"""Building blocks shared by the model families: label handling and conditional BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift are looked up per class.

    de Vries et al. 2017, "Modulating early visual processing by language"; the generator
    conditioning of Miyato & Koyama 2018 (cGANs with projection discriminator). Scales start at
    1 and shifts at 0, so an untrained layer is a plain BatchNorm.
    """

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.scale = nn.Embedding(num_classes, num_features)
        self.shift = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        scale = self.scale(labels)[:, :, None, None]
        shift = self.shift(labels)[:, :, None, None]
        return self.norm(x) * scale + shift


def batch_norm_2d(num_features: int, num_classes: int) -> nn.Module:
    """Conditional BatchNorm for a class-conditional model, plain BatchNorm otherwise."""
    if num_classes > 0:
        return ConditionalBatchNorm2d(num_features, num_classes)
    return nn.BatchNorm2d(num_features)


def apply_norm(norm: nn.Module, x: Tensor, labels: Tensor | None) -> Tensor:
    """Call a norm layer, passing labels only to the conditional kind."""
    if isinstance(norm, ConditionalBatchNorm2d):
        return norm(x, labels)
    return norm(x)


class ConditionalModule(nn.Module):
    """Base of every generator and discriminator: checks labels against `num_classes`."""

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes

    def check_labels(self, labels: Tensor | None, batch: int) -> None:
        """Fail loudly on a label/model mismatch instead of silently ignoring labels."""
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError(f"{type(self).__name__} is unconditional but got labels")
            return
        if labels is None:
            raise ValueError(
                f"{type(self).__name__} is conditional on {self.num_classes} classes: pass labels"
            )
        if labels.shape != (batch,) or labels.dtype != torch.long:
            raise ValueError(
                f"labels must be a LongTensor of shape ({batch},), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )


def projection(embedding: nn.Embedding | None, features: Tensor, labels: Tensor | None) -> Tensor:
    """Projection-discriminator term <embed(y), phi(x)> (Miyato & Koyama 2018, eq. 3); 0 if none."""
    if embedding is None:
        return features.new_zeros(features.shape[0])
    return (embedding(labels) * features).sum(dim=1)


def num_doublings(resolution: int, family: str) -> int:
    """log2(resolution / 4) for the convolutional families, which grow from a 4x4 map."""
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(
            f"{family} needs a power-of-two resolution >= 8 (8, 16, 32, 64, ...), got {resolution}"
        )
    return resolution.bit_length() - 3
