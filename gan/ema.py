"""Exponential moving average of the generator's weights.

Yazici et al. 2019, "The Unusual Effectiveness of Averaging in GAN Training"; used by
ProGAN/StyleGAN and BigGAN. Warm-up as in BigGAN (`ema_start`): for the first `warmup_steps`
updates the average copies the generator, since averaging the random initial weights only adds
noise. Buffers (BatchNorm statistics, spectral-norm vectors) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`)
    wrappers, in any nesting; the module itself when it is not wrapped."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


class GeneratorEMA:
    """Holds an eval-mode copy of the generator; `update` after every generator step.

    Under DDP, build it from the wrapped generator (after DDP has broadcast rank 0's weights),
    so every rank starts its average from the same weights.
    """

    def __init__(self, generator: nn.Module, decay: float, warmup_steps: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.model = copy.deepcopy(unwrap(generator)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        """Blend in the generator's weights after optimisation step `step` (0-based)."""
        source = unwrap(generator)
        decay = 0.0 if step < self.warmup_steps else self.decay
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), source.buffers(), strict=True):
            ema_buffer.copy_(buffer)
