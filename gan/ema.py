"""Exponential moving average of the generator's weights, with normalisation statistics that
belong to the averaged weights.

Yazici et al. 2019, "The Unusual Effectiveness of Averaging in GAN Training"; the horizon as in
StyleGAN2-ADA (Karras et al. 2020, training_loop.py `ema_kimg` / `ema_rampup`): a half-life in
images shown, not a decay per step, so the average spans the same amount of training whatever
the batch size and worker count, and a ramp-up (the half-life is at most `rampup` x the images
shown so far) so that a short run is not dominated by its random initial weights. Defaults:
10k images as StyleGAN2-ADA, ramp-up 0.01 where it uses 0.05: early in training the generator
moves fast, and measured on 32-px CIFAR-10 over 1-6k-step runs a half-life longer than about
10 steps made the average worse than the raw generator (bench/RESULTS.md). A 1,000-step run
at batch 128 ends with a half-life of 10 steps; from 1M images on it is 10k images.

BatchNorm running statistics are not averaged and not copied from the live generator: those
belong to the live weights (and, under train-mode forwards, lag them), and an averaged
network normalised with them can be far worse than either (measured: domain FID 169 against
20 for the raw generator on a 10k digit folder). `refresh_statistics` recomputes them for the
averaged weights on seed-fixed noise, as SWA does (`torch.optim.swa_utils.update_bn`); the
training loop calls it before the average is scored, saved or exported. Other buffers
(spectral-norm power-iteration vectors) are copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

Tensor = torch.Tensor
# (n, torch.Generator, device) -> (z, labels or None): a gan.sampling.LatentSampler
Sampler = Callable[[int, torch.Generator, torch.device], tuple[Tensor, Tensor | None]]

NORM_STATISTICS_SAMPLES = 2048  # noise samples the statistics are recomputed on
NORM_STATISTICS_BATCH = 128  # per forward: train-mode batch statistics, averaged over batches


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`)
    wrappers, in any nesting; the module itself when it is not wrapped."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _norm_statistic_names(module: nn.Module) -> set[str]:
    """Qualified names of the BatchNorm running statistics in `module`."""
    names = set()
    for prefix, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for buffer, _ in layer.named_buffers(recurse=False):
                names.add(f"{prefix}.{buffer}" if prefix else buffer)
    return names


@torch.no_grad()
def refresh_statistics(
    generator: nn.Module,
    sampler: Sampler,
    seed: int,
    num_samples: int = NORM_STATISTICS_SAMPLES,
    batch_size: int = NORM_STATISTICS_BATCH,
) -> nn.Module:
    """Recompute the BatchNorm running statistics of `generator` (in place) as the average of
    its train-mode batch statistics over `num_samples` noise draws seeded by `seed`; the
    generator is left in eval mode. Deterministic: the same weights and seed give the same
    statistics on every rank and every run. A network without BatchNorm is returned as is."""
    norms = _batch_norms(generator)
    if not norms:
        return generator.eval()
    device = next(generator.parameters()).device
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    draw = torch.Generator().manual_seed(seed)
    generator.train()
    try:
        for start in range(0, num_samples, batch_size):
            z, labels = sampler(min(batch_size, num_samples - start), draw, device)
            generator(z, labels)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        generator.eval()
    return generator


class GeneratorEMA:
    """Holds an eval-mode copy of the generator; `update` after every generator step.

    `images_per_step`: images one generator update sees across all ranks (the global batch).
    `images_before`, for a batch that changes during training (ProGAN's batch per
    resolution): the images generator updates before update k saw (0-based; default k x
    images_per_step). Under DDP, build it from the wrapped generator (after DDP has broadcast
    rank 0's weights), so every rank starts its average from the same weights.
    """

    def __init__(
        self,
        generator: nn.Module,
        half_life_images: float,
        images_per_step: int,
        rampup: float | None = 0.01,
        images_before: Callable[[int], int] | None = None,
    ):
        if half_life_images < 0:
            raise ValueError(f"EMA half-life must be >= 0 images, got {half_life_images}")
        if rampup is not None and rampup <= 0:
            raise ValueError(f"EMA ramp-up must be > 0 or None, got {rampup}")
        if images_per_step < 1:
            raise ValueError(f"images_per_step must be >= 1, got {images_per_step}")
        self.half_life_images = half_life_images
        self.images_per_step = images_per_step
        self.images_before = images_before or (lambda step: step * images_per_step)
        self.rampup = rampup
        self.model = copy.deepcopy(unwrap(generator)).eval().requires_grad_(False)
        statistics = _norm_statistic_names(self.model)
        self._copied = [name for name, _ in self.model.named_buffers() if name not in statistics]
        self._has_statistics = bool(statistics)  # fixed by the architecture: not re-walked
        self.statistics_fresh = not statistics

    def beta(self, step: int) -> float:
        """The share of the old average kept after generator update `step` (0-based)."""
        images = self.images_before(step + 1)
        half_life = self.half_life_images
        if self.rampup is not None:
            half_life = min(half_life, images * self.rampup)
        if half_life <= 0:
            return 0.0
        return 0.5 ** ((images - self.images_before(step)) / half_life)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int, skip: Tensor | None = None) -> None:
        """Blend in the generator's weights after optimisation step `step` (0-based).

        `skip`: a 0-d bool tensor (gan.step's "this update was skipped"); where it is true the
        average and its copied buffers stay as they are, decided on the device."""
        source = unwrap(generator)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in source.parameters()]
        weight = 1.0 - self.beta(step)
        if skip is None:
            torch._foreach_lerp_(ema_params, params, weight)
        else:  # lerp with a weight of 0 leaves the average bitwise as it is
            weights = [torch.where(skip, 0.0, weight)] * len(ema_params)
            torch._foreach_lerp_(ema_params, params, weights)
        if self._copied:
            buffers = dict(source.named_buffers())
            own = dict(self.model.named_buffers())
            for name in self._copied:
                update = (
                    buffers[name] if skip is None else torch.where(skip, own[name], buffers[name])
                )
                own[name].copy_(update)
        self.statistics_fresh = not self._has_statistics

    def averaged(self, sampler: Sampler, seed: int) -> nn.Module:
        """The averaged generator with BatchNorm statistics computed for its own weights
        (recomputed only if it changed since the last call)."""
        if not self.statistics_fresh:
            refresh_statistics(self.model, sampler, seed)
            self.statistics_fresh = True
        return self.model
