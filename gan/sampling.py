"""Seeded randomness: one generator per (seed, rank, step) and a latent/label sampler.

Every random draw of a training step comes from `step_generator(seed, rank, step)`, so a run
resumed at step k draws exactly what the uninterrupted run drew, with no RNG state to save, and
ranks draw different noise. `fixed_latents` gives the same samples on every rank and every run
(for sample grids and evaluation).
"""

from __future__ import annotations

import torch

from gan.tasks import Task, task_for

Tensor = torch.Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """Steele et al. 2014 SplitMix64 finaliser: a stable, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*keys: int) -> int:
    """Combine integer keys into one 63-bit seed, identical on every platform and run."""
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (key & _MASK64))
    return state >> 1


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """`x`, drawn on the CPU, on `device` without a host synchronisation: on CUDA through pinned
    memory and an asynchronous copy (a plain copy from pageable memory waits for the GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator for every random draw of training step `step` on rank `rank`."""
    return torch.Generator().manual_seed(mix_seed(seed, rank, step))


class LatentSampler:
    """Draws N(0, I) noise and the fakes' conditions as the task says (gan.tasks): uniform
    class labels, the real batch's own conditions (paired tasks), or none."""

    def __init__(self, z_dim: int, num_classes: int = 0, task: Task | None = None):
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.task = task or task_for(num_classes > 0)

    def __call__(
        self,
        n: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        real_conditions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        z = to_device(torch.randn(n, self.z_dim, generator=generator), device)
        conditions = self.task.fake_conditions(real_conditions, n, self.num_classes, generator)
        if conditions is None or self.task.paired:  # a paired task's are on the device
            return z, conditions
        return z, to_device(conditions, device)


def fixed_latents(
    n: int, z_dim: int, num_classes: int = 0, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """The same noise on every rank and run; labels cycle 0..K-1 so grids show every class."""
    z = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    if num_classes == 0:
        return z, None
    return z, (torch.arange(n) % num_classes).to(device)


@torch.no_grad()
def generate(
    generator: torch.nn.Module,
    n: int,
    z_dim: int,
    num_classes: int = 0,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 256,
) -> Tensor:
    """`n` images in [-1, 1] (float32, CPU) from the same seed-fixed noise as `fixed_latents`;
    conditional models get `label` for every image, or labels cycling through the classes."""
    device = next(generator.parameters()).device
    z, labels = fixed_latents(n, z_dim, num_classes, seed)
    if num_classes and label is not None:
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} is outside the model's classes 0..{num_classes - 1}")
        labels = torch.full((n,), label, dtype=torch.long)
    chunks = []
    for start in range(0, n, batch_size):
        part = None if labels is None else labels[start : start + batch_size].to(device)
        chunks.append(generator(z[start : start + batch_size].to(device), part).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)
