"""DiffAugment: differentiable augmentation applied to real and fake samples alike.

Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"; the same three
policies as the authors' DiffAugment_pytorch.py (color = brightness, saturation, contrast;
translation by up to 1/8 of the image with zero padding; cutout of a half-size square). Every
random draw comes from the `generator` passed in (on the CPU, then moved), so a seeded step
augments identically on every run and every device. Each sample gets its own transform; all
channels of one sample share it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

POLICIES = ("color", "translation", "cutout")


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One U[0, 1) draw per sample, shaped to broadcast over C, H, W."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator).to(x.device, x.dtype)


def _randint(low: int, high: int, n: int, generator: torch.Generator | None, device) -> Tensor:
    return torch.randint(low, high, (n, 1, 1), generator=generator).to(device)


def color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random brightness (+-0.5), saturation (x[0, 2]) and contrast (x[0.5, 1.5])."""
    x = x + (_uniform(x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def translation(
    x: Tensor, generator: torch.Generator | None = None, ratio: float = 0.125
) -> Tensor:
    """Shift each sample by up to `ratio` of its size, filling with zeros."""
    b, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(-shift_h, shift_h + 1, b, generator, x.device)
    dx = _randint(-shift_w, shift_w + 1, b, generator, x.device)
    grid_b, grid_y, grid_x = torch.meshgrid(
        torch.arange(b, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )
    grid_y = torch.clamp(grid_y + dy + 1, 0, h + 1)
    grid_x = torch.clamp(grid_x + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[grid_b, grid_y, grid_x].permute(0, 3, 1, 2)


def cutout(x: Tensor, generator: torch.Generator | None = None, ratio: float = 0.5) -> Tensor:
    """Zero a square of `ratio` of the image size at a random centre of each sample."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(0, h + (1 - size_h % 2), b, generator, x.device)
    cx = _randint(0, w + (1 - size_w % 2), b, generator, x.device)
    grid_b, grid_y, grid_x = torch.meshgrid(
        torch.arange(b, device=x.device),
        torch.arange(size_h, device=x.device),
        torch.arange(size_w, device=x.device),
        indexing="ij",
    )
    grid_y = torch.clamp(grid_y + cy - size_h // 2, 0, h - 1)
    grid_x = torch.clamp(grid_x + cx - size_w // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[grid_b, grid_y, grid_x] = 0
    return x * mask.unsqueeze(1)


_TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}


def check_policy(policy: Sequence[str]) -> None:
    """Reject unknown policy names before training starts."""
    unknown = [p for p in policy if p not in _TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; expected names from {POLICIES}")


def diff_augment(
    x: Tensor, policy: Sequence[str], generator: torch.Generator | None = None
) -> Tensor:
    """Apply the named transforms in the authors' order (color, translation, cutout)."""
    check_policy(policy)
    for name in POLICIES:
        if name in policy:
            x = _TRANSFORMS[name](x, generator)
    return x
