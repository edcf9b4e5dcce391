"""Seeded randomness: one generator per (seed, rank, step), a latent/label sampler, and the
sampling tools applied to a trained generator's noise (truncation, interpolation).

Every random draw of a training step comes from `step_generator(seed, rank, step)`, so a run
resumed at step k draws exactly what the uninterrupted run drew, with no RNG state to save, and
ranks draw different noise. `fixed_latents` gives the same samples on every rank and every run
(for sample grids and evaluation).

Truncation (`truncate`): z' = psi * z, the truncation trick in the form of StyleGAN (Karras et
al. 2019, eq. 4: w' = mean + psi * (w - mean)) applied to the noise itself, whose mean under
N(0, I) is 0. 0 <= psi <= 1; psi = 1 leaves the noise untouched (the same images, bit for bit),
psi = 0 gives every sample G(0). BigGAN's variant (Brock et al. 2018: redraw the values beyond
a threshold) is not used: it needs more random draws, so the seed would no longer fix the
noise of the other values, and it is not continuous in its threshold.

Interpolation (`interpolate_latents`): frames at t = 0, 1/(K-1), ..., 1 between the noise of two
seeds, as weights (w_a, w_b) per frame, z_t = w_a * z_a + w_b * z_b, so the first and last frames
are the endpoints bit for bit. `lerp`: w = (1 - t, t). `slerp`: the direction moves along the
great circle (Shoemake 1985, recommended for Gaussian latents by White 2016, "Sampling
Generative Networks") while the norm moves linearly from |z_a| to |z_b|, so every frame's norm
lies between the endpoints' (a lerp's midpoint of two independent draws is ~1/sqrt(2) as long,
atypical noise for the generator). With equal norms this is White's formula; for (nearly)
parallel endpoints it falls back to lerp.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

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


TRUNCATION_RANGE = (0.0, 1.0)  # psi: 1 changes nothing, 0 gives every sample G(0)


def check_truncation(psi) -> float:
    """`psi` as a float once it is a real number (not a bool or a string) in TRUNCATION_RANGE;
    ValueError saying what was expected otherwise."""
    low, high = TRUNCATION_RANGE
    if isinstance(psi, bool) or not isinstance(psi, numbers.Real):
        raise ValueError(
            f"truncation must be a number from {low:g} to {high:g} (1 changes nothing), got "
            f"{psi!r} ({type(psi).__name__})"
        )
    if not low <= psi <= high:  # NaN fails too
        raise ValueError(
            f"truncation must be from {low:g} to {high:g} (psi: 1 changes nothing, smaller "
            f"values pull the noise toward its mean 0), got {psi}"
        )
    return float(psi)


def truncate(z: Tensor, psi: float = 1.0) -> Tensor:
    """The truncation trick on N(0, I) noise: psi * z (see the module's header); `z` itself
    when psi is 1."""
    psi = check_truncation(psi)
    return z if psi == 1.0 else z * psi


def _lerp_weights(t: Tensor, cos: Tensor, norms: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return 1 - t, t


def _slerp_weights(t: Tensor, cos: Tensor, norms: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    norm_a, norm_b = norms
    if sin < 1e-6 or norm_a == 0 or norm_b == 0:  # parallel (or zero) endpoints: no circle
        return _lerp_weights(t, cos, norms)
    radius = (1 - t) * norm_a + t * norm_b
    on_a, on_b = torch.sin((1 - t) * omega) / sin, torch.sin(t * omega) / sin
    return on_a * radius / norm_a, on_b * radius / norm_b  # exactly (1, 0) and (0, 1) at the ends


# method -> the frames' weights (w_a, w_b) from t, cos(angle between the endpoints), their norms
INTERPOLATIONS: dict[str, Callable] = {"lerp": _lerp_weights, "slerp": _slerp_weights}


def interpolate_latents(z_a: Tensor, z_b: Tensor, steps: int, method: str = "slerp") -> Tensor:
    """`steps` (>= 2) points from `z_a` to `z_b` (1-D, the same length), shape (steps, D); the
    first is `z_a` and the last `z_b` bit for bit. `method`: one of INTERPOLATIONS."""
    if method not in INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {method!r}; expected one of {tuple(INTERPOLATIONS)}"
        )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"interpolation steps must be an integer of at least 2, got {steps!r}")
    if z_a.dim() != 1 or z_a.shape != z_b.shape:
        raise ValueError(
            f"endpoints must be two vectors of one length, got {z_a.shape}, {z_b.shape}"
        )
    a, b = z_a.double(), z_b.double()
    norms = (a.norm(), b.norm())
    cos = (a @ b) / (norms[0] * norms[1]) if norms[0] * norms[1] > 0 else a.new_tensor(1.0)
    t = torch.linspace(0, 1, int(steps), dtype=torch.float64)
    w_a, w_b = INTERPOLATIONS[method](t, cos, norms)
    w_a, w_b = w_a.to(z_a.dtype)[:, None], w_b.to(z_a.dtype)[:, None]
    return w_a * z_a + w_b * z_b


def seed_latent(seed: int, z_dim: int) -> Tensor:
    """The noise of seed `seed` alone: what `generate(..., n=1, seed=seed)` draws (1-D)."""
    return fixed_latents(1, z_dim, seed=seed)[0][0]


def _check_label(label: int | None, num_classes: int) -> None:
    if num_classes and label is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside the model's classes 0..{num_classes - 1}")


@torch.no_grad()
def generate_from(
    generator: torch.nn.Module, z: Tensor, labels: Tensor | None, batch_size: int = 256
) -> Tensor:
    """The images (float32, CPU, in [-1, 1]) of noise `z` (N, z_dim) and `labels` (N,) or None,
    in batches of `batch_size` on the generator's device."""
    device = next(generator.parameters()).device
    chunks = []
    for start in range(0, len(z), batch_size):
        part = None if labels is None else labels[start : start + batch_size].to(device)
        chunks.append(generator(z[start : start + batch_size].to(device), part).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def generate(
    generator: torch.nn.Module,
    n: int,
    z_dim: int,
    num_classes: int = 0,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 256,
    truncation: float = 1.0,
) -> Tensor:
    """`n` images in [-1, 1] (float32, CPU) from the same seed-fixed noise as `fixed_latents`,
    truncated by `truncation` (psi; 1 changes nothing); conditional models get `label` for every
    image, or labels cycling through the classes."""
    psi = check_truncation(truncation)
    _check_label(label, num_classes)
    z, labels = fixed_latents(n, z_dim, num_classes, seed)
    if num_classes and label is not None:
        labels = torch.full((n,), label, dtype=torch.long)
    return generate_from(generator, truncate(z, psi), labels, batch_size)


def interpolate(
    generator: torch.nn.Module,
    z_dim: int,
    num_classes: int,
    from_seed: int,
    to_seed: int,
    steps: int,
    method: str = "slerp",
    label: int | None = None,
    truncation: float = 1.0,
) -> Tensor:
    """`steps` images in [-1, 1] (float32, CPU) along the path from seed `from_seed`'s noise to
    `to_seed`'s (see `interpolate_latents`), truncated by `truncation`; the first and last are
    `generate(..., 1, seed=from_seed)` and `generate(..., 1, seed=to_seed)` with the same label
    and truncation. Conditional models draw class `label` in every frame (None: class 0, the
    class `generate` gives a single image)."""
    psi = check_truncation(truncation)
    _check_label(label, num_classes)
    z = interpolate_latents(
        seed_latent(from_seed, z_dim), seed_latent(to_seed, z_dim), steps, method
    )
    labels = torch.full((len(z),), label or 0, dtype=torch.long) if num_classes else None
    return generate_from(generator, truncate(z, psi), labels)
