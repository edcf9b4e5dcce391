"""One GAN training step: `n_critic` discriminator updates, then one generator update.

Framework-agnostic: plain modules or DistributedDataParallel-wrapped ones, any device. All
randomness comes from the `generator` argument (see gan.sampling.step_generator).

Non-finite values (losses, penalties, D outputs or the gradient norm) stop training with
NonFiniteError before the optimiser steps. Under torch.distributed the ranks decide together
(one all-reduce of a flag per update): a loss can be infinite on one rank while the averaged
gradients stay finite, and a rank that stopped alone would leave the others waiting forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from gan.augment import check_policy, diff_augment
from gan.ema import GeneratorEMA
from gan.losses import get_loss
from gan.regularizers import gradient_penalty, r1_penalty
from gan.sampling import LatentSampler

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor | None]


class NonFiniteError(FloatingPointError):
    """Training diverged: a loss or gradient norm became NaN or infinite."""

    def __init__(self, step: int, phase: str, values: dict[str, float]):
        self.step = step
        self.phase = phase
        self.values = values
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        super().__init__(f"diverged at step {step}: non-finite {phase} update ({shown})")


@dataclass(frozen=True)
class StepConfig:
    """What one step does. Zero weights switch a regularizer off."""

    loss: str  # adversarial loss, a key of gan.losses.LOSSES
    n_critic: int = 1  # discriminator updates per generator update
    gp_weight: float = 0.0  # WGAN-GP lambda
    r1_gamma: float = 0.0  # R1 gamma; the penalty is gamma / 2 * E||grad D(x)||^2
    r1_every: int = 1  # lazy R1: every k-th discriminator update, scaled by k
    diffaugment: Sequence[str] = field(default_factory=tuple)  # DiffAugment policy names
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on GPUs that support it

    def __post_init__(self):
        get_loss(self.loss)
        check_policy(self.diffaugment)
        if self.n_critic < 1 or self.r1_every < 1:
            raise ValueError("n_critic and r1_every must be >= 1")
        if self.gp_weight < 0 or self.r1_gamma < 0:
            raise ValueError("gp_weight and r1_gamma must be >= 0")


def _grad_norm(module: nn.Module) -> Tensor:
    """The global L2 norm of the gradients, in float64 so huge finite gradients stay finite."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def _check_finite(step: int, phase: str, values: dict[str, Tensor]) -> dict[str, float]:
    """Plain floats (one device sync), or NonFiniteError if any value on any rank is not finite."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    bad = (~torch.isfinite(stacked)).any().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    *numbers, any_bad = torch.cat([stacked, bad]).tolist()
    floats = dict(zip(values, numbers, strict=True))
    if any_bad:
        raise NonFiniteError(step, phase, floats)
    return floats


def _no_sync(module: nn.Module):
    """DDP's no_sync for a module used but not trained in this phase; a no-op otherwise."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


@dataclass
class GANTrainState:
    """Everything a step updates: both networks, their optimisers and the generator EMA."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: GeneratorEMA | None = None


def train_step(
    state: GANTrainState,
    batches: Iterator[Batch],
    cfg: StepConfig,
    sampler: LatentSampler,
    generator: torch.Generator,
    step: int,
) -> dict[str, float]:
    """Run one step and return plain floats: losses, D outputs, gradient norms, penalties.

    `batches` yields (real images, labels or None); the step takes `n_critic` of them.
    """
    G, D = state.generator, state.discriminator
    loss = get_loss(cfg.loss)

    def augment(x: Tensor) -> Tensor:
        return diff_augment(x, cfg.diffaugment, generator) if cfg.diffaugment else x

    def autocast(device: torch.device):
        enabled = cfg.autocast_dtype is not None
        return torch.autocast(device.type, dtype=cfg.autocast_dtype, enabled=enabled)

    d_sums: dict[str, float] = {}
    for i in range(cfg.n_critic):
        real, real_labels = next(batches)
        device = real.device
        with torch.no_grad(), autocast(device):
            z, fake_labels = sampler(real.shape[0], generator, device)
            fake = G(z, fake_labels)
        lazy_r1 = cfg.r1_gamma > 0 and (step * cfg.n_critic + i) % cfg.r1_every == 0
        real_in = real.detach().requires_grad_(lazy_r1)
        real_seen, fake_seen = augment(real_in), augment(fake.to(real.dtype))
        with autocast(device):
            real_logits = D(real_seen, real_labels).float()
            fake_logits = D(fake_seen, fake_labels).float()
        loss_d = loss.d_loss(real_logits, fake_logits)
        total = loss_d
        gp = r1 = torch.zeros((), device=device)
        if cfg.gp_weight > 0:
            # On what D saw (augmented), with the real labels for the interpolates, in fp32.
            gp = gradient_penalty(D, real_seen, fake_seen, real_labels, generator)
            total = total + cfg.gp_weight * gp
        if lazy_r1:
            r1 = r1_penalty(real_logits, real_in)
            total = total + cfg.r1_gamma / 2 * r1 * cfg.r1_every
        state.opt_d.zero_grad(set_to_none=True)
        total.backward()
        values = {
            "loss_d": loss_d,
            "gp": gp,
            "r1": r1,
            "grad_norm_d": _grad_norm(D),
            "d_real_logit": real_logits.mean(),
            "d_fake_logit": fake_logits.mean(),
            "d_real": torch.sigmoid(real_logits).mean(),
            "d_fake": torch.sigmoid(fake_logits).mean(),
        }
        for k, v in _check_finite(step, "d", values).items():
            d_sums[k] = d_sums.get(k, 0.0) + v
        state.opt_d.step()

    # Generator phase: D is frozen (no weight gradients) and, under DDP, not all-reduced.
    trainable = [p for p in D.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        z, fake_labels = sampler(real.shape[0], generator, device)
        with _no_sync(D), autocast(device):
            fake_logits = D(augment(G(z, fake_labels)), fake_labels).float()
        loss_g = loss.g_loss(fake_logits)
        state.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    g_values = _check_finite(step, "g", {"loss_g": loss_g, "grad_norm_g": _grad_norm(G)})
    state.opt_g.step()
    if state.ema is not None:
        state.ema.update(G, step)
    return {k: v / cfg.n_critic for k, v in d_sums.items()} | g_values
