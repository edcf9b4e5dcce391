"""One GAN training step: `n_critic` discriminator updates, then one generator update.

Framework-agnostic: plain modules or DistributedDataParallel-wrapped ones, any device. All
randomness comes from the `generator` argument (see gan.sampling.step_generator).

No host synchronisation: a step reads nothing back from the device, so on a GPU it only
queues work. Its metrics come back as 0-d tensors on the device (`to_floats` turns them into
plain floats with one transfer, at report time).

- With `n_critic == 1` the generator update reuses the batch generated for the discriminator
  update, as the classic DCGAN recipe does (one generator forward per step): D trains on
  `fake.detach()`, and after D's update G's loss is D(augment(fake)). With `n_critic > 1` the
  generator update draws fresh noise, as before.
- Non-finite values (losses, penalties, D outputs or the gradient norm) are found on the device
  and the update is not applied, as AMP's GradScaler skips a step: an optimiser that supports it
  (`torch.optim.Adam(fused=True)`, which `adam` below builds where the device has the fused
  kernel) gets GradScaler's `found_inf` and skips parameters and state in its kernel. Any other
  optimiser (or a fused Adam whose flag a loaded state dict turned off) falls back to one host
  read of the flag per update, which skips the step on the host (a synchronisation per update,
  the price of an optimiser that cannot skip on the device).
- Once an update is non-finite, every later update of the run is skipped too (the flag is
  sticky), so parameters, optimiser state and the generator EMA stay those from before the
  first bad update. Buffers that forwards update (BatchNorm running statistics, spectral-norm
  vectors in D) are not rolled back: nothing of a diverged run should be saved.
- Under torch.distributed the ranks decide together (an all-reduce MAX of a flag per update,
  asynchronous on NCCL): a loss can be infinite on one rank while the averaged gradients stay
  finite, and a rank that skipped alone would drift from the others.
- `GANTrainState.divergence` records, on the device, the first bad step, its phase ("d" or
  "g") and the values of that update. `Divergence.raise_if_diverged()` (one host transfer; call
  it at each report, before saving anything) raises NonFiniteError naming that first step, on
  every rank at the same report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from gan.augment import check_policy, diff_augment
from gan.ema import GeneratorEMA
from gan.losses import get_loss
from gan.regularizers import gradient_penalty, r1_penalty
from gan.sampling import LatentSampler

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor | None]

D_KEYS = (
    "loss_d", "gp", "r1", "grad_norm_d", "d_real_logit", "d_fake_logit", "d_real", "d_fake"
)  # fmt: skip
G_KEYS = ("loss_g", "grad_norm_g")
PHASES = {"d": D_KEYS, "g": G_KEYS}  # what a divergence record holds per phase


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
    drift_weight: float = 0.0  # ProGAN's epsilon_drift: + weight * E[D(x_real)^2] in D's loss
    diffaugment: Sequence[str] = field(default_factory=tuple)  # DiffAugment policy names
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on GPUs that support it

    def __post_init__(self):
        get_loss(self.loss)
        check_policy(self.diffaugment)
        if self.n_critic < 1 or self.r1_every < 1:
            raise ValueError("n_critic and r1_every must be >= 1")
        if self.gp_weight < 0 or self.r1_gamma < 0 or self.drift_weight < 0:
            raise ValueError("gp_weight, r1_gamma and drift_weight must be >= 0")


def adam(
    parameters: Iterable[nn.Parameter], lr: float, betas: tuple[float, float]
) -> torch.optim.Adam:
    """The optimiser the step is built for: Adam with the fused kernel (which skips a
    non-finite update on the device) where every parameter's device has it, else plain Adam
    (the step then skips on the host)."""
    params = list(parameters)
    fused = bool(params) and all(
        p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
        for p in params
    )
    return torch.optim.Adam(params, lr, betas=betas, fused=fused or None)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours GradScaler's `found_inf` (fused Adam and the like);
    a state dict from a non-fused optimiser turns the fused flag of its groups off."""
    return getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def _apply(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """optimizer.step() unless `skip` (a 0-d bool on the device)."""
    if skips_on_device(optimizer):
        # GradScaler's contract (torch.amp.GradScaler.step): the fused kernel leaves parameters
        # and state alone where found_inf is 1; grad_scale None: the gradients are not scaled.
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():  # the host fallback: one synchronisation per update
        optimizer.step()


class Divergence:
    """The first non-finite update of a run, recorded on the device.

    `flag` is a 0-d float32 tensor, 1 from the first update that was not finite on any rank
    (sticky); the step, phase and values of that update are kept beside it. Nothing is read
    back until `raise_if_diverged`.
    """

    def __init__(self):
        self.flag: Tensor | None = None
        self._step: Tensor | None = None  # int64, -1 until diverged
        self._phase: Tensor | None = None  # index into PHASES
        self._values: dict[str, Tensor] = {}  # phase -> float32 values in PHASES[phase] order

    def update(self, step: int, phase: str, values: Tensor) -> Tensor:
        """Record update `values` (float32, in PHASES[phase] order) of `step`; return the 0-d
        bool "skip this update" (this update or an earlier one was not finite on some rank)."""
        if self.flag is None:
            self.flag = torch.zeros((), device=values.device)
            self._step = torch.full((), -1, dtype=torch.int64, device=values.device)
            self._phase = torch.full((), -1, dtype=torch.int64, device=values.device)
        bad = (~torch.isfinite(values)).any().float().reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank takes the same decision
        first = (bad.reshape(()) > 0) & (self.flag == 0)
        self._step = torch.where(first, step, self._step)
        self._phase = torch.where(first, list(PHASES).index(phase), self._phase)
        kept = self._values.get(phase, torch.zeros_like(values))
        self._values[phase] = torch.where(first, values, kept)
        self.flag = torch.maximum(self.flag, bad.reshape(()))
        return self.flag > 0

    def raise_if_diverged(self) -> None:
        """NonFiniteError(first bad step, phase, that update's values on this rank) if the run
        diverged; one host transfer. Every rank raises at the same call (the flag is shared)."""
        if self.flag is None:
            return
        phases = list(PHASES)
        recorded = [
            self._values.get(p, torch.zeros(len(PHASES[p]), device=self.flag.device))
            for p in phases
        ]
        head = torch.stack([self.flag.double(), self._step.double(), self._phase.double()])
        flag, step, phase, *numbers = torch.cat([head, *(v.double() for v in recorded)]).tolist()
        if not flag:
            return
        name = phases[int(phase)]
        start = sum(len(PHASES[p]) for p in phases[: int(phase)])
        values = dict(zip(PHASES[name], numbers[start : start + len(PHASES[name])], strict=True))
        raise NonFiniteError(int(step), name, values)


def to_floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """A step's metrics as plain floats, with one host transfer for all the tensors."""
    tensors = {k: v for k, v in metrics.items() if torch.is_tensor(v)}
    floats = {k: float(v) for k, v in metrics.items() if k not in tensors}
    if tensors:
        stacked = torch.stack([v.detach().double().reshape(()) for v in tensors.values()])
        floats |= dict(zip(tensors, stacked.tolist(), strict=True))
    return {k: floats[k] for k in metrics}


def _grad_norm(module: nn.Module, device: torch.device) -> Tensor:
    """The global L2 norm of the gradients, in float64 so huge finite gradients stay finite."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def _stacked(values: Sequence[Tensor]) -> Tensor:
    return torch.stack([v.detach().float().reshape(()) for v in values])


def _no_sync(module: nn.Module):
    """DDP's no_sync for a module used but not trained in this phase; a no-op otherwise."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


@dataclass
class GANTrainState:
    """Everything a step updates: both networks, their optimisers, the generator EMA and the
    record of a divergence."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: GeneratorEMA | None = None
    divergence: Divergence = field(default_factory=Divergence)


def train_step(
    state: GANTrainState,
    batches: Iterator[Batch],
    cfg: StepConfig,
    sampler: LatentSampler,
    generator: torch.Generator,
    step: int,
) -> dict[str, Tensor]:
    """Run one step; return 0-d tensors on the device: losses, D outputs, gradient norms,
    penalties (the D figures averaged over the `n_critic` updates).

    `batches` yields (real images, labels or None); the step takes `n_critic` of them. A
    non-finite update is skipped and recorded in `state.divergence` (see the module header).
    """
    G, D = state.generator, state.discriminator
    loss = get_loss(cfg.loss)
    reuse = cfg.n_critic == 1  # the G update trains on the D update's fake batch

    def augment(x: Tensor) -> Tensor:
        return diff_augment(x, cfg.diffaugment, generator) if cfg.diffaugment else x

    def autocast(device: torch.device):
        enabled = cfg.autocast_dtype is not None
        return torch.autocast(device.type, dtype=cfg.autocast_dtype, enabled=enabled)

    d_sum = None
    for i in range(cfg.n_critic):
        real, real_labels = next(batches)
        device = real.device
        with torch.set_grad_enabled(reuse), autocast(device):
            z, fake_labels = sampler(real.shape[0], generator, device, real_labels)
            fake = G(z, fake_labels)
        lazy_r1 = cfg.r1_gamma > 0 and (step * cfg.n_critic + i) % cfg.r1_every == 0
        real_in = real.detach().requires_grad_(lazy_r1)
        real_seen, fake_seen = augment(real_in), augment(fake.detach().to(real.dtype))
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
        if cfg.drift_weight > 0:  # keeps a critic's outputs near 0 (Karras et al. 2018)
            total = total + cfg.drift_weight * real_logits.square().mean()
        if lazy_r1:
            r1 = r1_penalty(real_logits, real_in)
            total = total + cfg.r1_gamma / 2 * r1 * cfg.r1_every
        state.opt_d.zero_grad(set_to_none=True)
        total.backward()
        values = _stacked(
            [loss_d, gp, r1, _grad_norm(D, device), real_logits.mean(), fake_logits.mean(),
             torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()]
        )  # fmt: skip
        _apply(state.opt_d, state.divergence.update(step, "d", values))
        d_sum = values if d_sum is None else d_sum + values

    # Generator phase: D is frozen (no weight gradients) and, under DDP, not all-reduced.
    trainable = [p for p in D.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with _no_sync(D), autocast(device):
            if not reuse:
                z, fake_labels = sampler(real.shape[0], generator, device, real_labels)
                fake = G(z, fake_labels)
            fake_logits = D(augment(fake), fake_labels).float()
        loss_g = loss.g_loss(fake_logits)
        state.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    g_values = _stacked([loss_g, _grad_norm(G, device)])
    skip = state.divergence.update(step, "g", g_values)
    _apply(state.opt_g, skip)
    if state.ema is not None:
        state.ema.update(G, step, skip=skip)
    d_mean = d_sum / cfg.n_critic if cfg.n_critic > 1 else d_sum
    return dict(zip(D_KEYS, d_mean.unbind(), strict=True)) | dict(
        zip(G_KEYS, g_values.unbind(), strict=True)
    )
