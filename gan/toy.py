"""The 2-D mode-collapse test bed: mixtures of Gaussians and a mode-coverage metric.

The ring of 8 Gaussians (radius 2, std 0.02) is the benchmark of Metz et al. 2017 ("Unrolled
GANs"); the 5x5 grid (spacing 2, std 0.05) the one of Srivastava et al. 2017 (VEEGAN) and Lin
et al. 2018 (PacGAN). A sample is high quality when it lies within 3 standard deviations of its
nearest mode (VEEGAN); a mode is covered when at least 20 of every 2,500 samples are high-quality
samples of that mode (PacGAN's rule).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from gan.ema import GeneratorEMA
from gan.models.mlp import MLPDiscriminator, MLPGenerator
from gan.regularizers import apply_spectral_norm
from gan.sampling import LatentSampler, fixed_latents, step_generator
from gan.step import GANTrainState, StepConfig, to_floats, train_step

Tensor = torch.Tensor

MIN_MODE_SHARE = 20 / 2500


@dataclass(frozen=True)
class GaussianMixture:
    """Equal-weight isotropic Gaussians at `centers` (K x 2) with one standard deviation."""

    centers: Tensor
    std: float

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        modes = torch.randint(0, len(self.centers), (n,), generator=generator)
        return self.centers[modes] + self.std * torch.randn(n, 2, generator=generator)


def ring_mixture(modes: int = 8, radius: float = 2.0, std: float = 0.02) -> GaussianMixture:
    angles = torch.arange(modes) * (2 * math.pi / modes)
    return GaussianMixture(radius * torch.stack([angles.cos(), angles.sin()], dim=1), std)


def grid_mixture(side: int = 5, spacing: float = 2.0, std: float = 0.05) -> GaussianMixture:
    axis = (torch.arange(side) - (side - 1) / 2) * spacing
    return GaussianMixture(torch.cartesian_prod(axis, axis), std)


MIXTURES = {"ring": ring_mixture, "grid": grid_mixture}


@dataclass(frozen=True)
class Coverage:
    """How many modes a sample covers and how much of it is high quality."""

    modes_covered: int
    num_modes: int
    high_quality_share: float
    per_mode_counts: tuple[int, ...]


def mode_coverage(samples: Tensor, mixture: GaussianMixture) -> Coverage:
    """Score samples (N x 2) against the mixture's modes."""
    distances = torch.cdist(samples.double(), mixture.centers.double())
    nearest_distance, nearest = distances.min(dim=1)
    high_quality = nearest_distance <= 3 * mixture.std
    counts = torch.bincount(nearest[high_quality], minlength=len(mixture.centers))
    covered = int((counts >= MIN_MODE_SHARE * len(samples)).sum())
    return Coverage(
        modes_covered=covered,
        num_modes=len(mixture.centers),
        high_quality_share=float(high_quality.double().mean()),
        per_mode_counts=tuple(counts.tolist()),
    )


@dataclass(frozen=True)
class ToyGANConfig:
    """A small MLP GAN on a 2-D mixture; the fields mirror params.yaml's model/train keys."""

    mixture: str = "ring"  # ring (8 modes) or grid (25 modes)
    loss: str = "wasserstein"
    spectral_norm: bool = False  # on the discriminator
    gp_weight: float = 1.0
    r1_gamma: float = 0.0
    n_critic: int = 1
    lr_g: float = 1e-3
    lr_d: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.9)
    steps: int = 4000
    batch_size: int = 256
    z_dim: int = 16
    width: int = 128
    depth: int = 3
    ema_kimg: float = 10.0  # EMA half-life in thousands of images: ~40 steps, a short average
    # (long ones blur the generator between modes)
    ema_rampup: float | None = 0.05  # half-life at most this share of the images shown so far
    eval_samples: int = 2500
    seed: int = 0


def train_toy_gan(cfg: ToyGANConfig) -> dict:
    """Train on CPU and return the coverage of the EMA generator plus the last step's figures."""
    torch.manual_seed(cfg.seed)
    mixture = MIXTURES[cfg.mixture]()
    G = MLPGenerator((2,), cfg.z_dim, cfg.width, cfg.depth, tanh=False)
    D = MLPDiscriminator((2,), cfg.width, cfg.depth)
    if cfg.spectral_norm:
        apply_spectral_norm(D)
    state = GANTrainState(
        generator=G,
        discriminator=D,
        opt_g=torch.optim.Adam(G.parameters(), cfg.lr_g, betas=cfg.betas),
        opt_d=torch.optim.Adam(D.parameters(), cfg.lr_d, betas=cfg.betas),
        ema=GeneratorEMA(G, cfg.ema_kimg * 1000, cfg.batch_size, cfg.ema_rampup),
    )
    step_cfg = StepConfig(
        loss=cfg.loss, n_critic=cfg.n_critic, gp_weight=cfg.gp_weight, r1_gamma=cfg.r1_gamma
    )
    sampler = LatentSampler(cfg.z_dim)
    data_rng = torch.Generator().manual_seed(cfg.seed)

    def real_batches():
        while True:
            yield mixture.sample(cfg.batch_size, data_rng), None

    batches = real_batches()
    last: dict = {}
    for step in range(cfg.steps):
        last = train_step(
            state, batches, step_cfg, sampler, step_generator(cfg.seed, 0, step), step
        )
    state.divergence.raise_if_diverged()  # NonFiniteError naming the first bad update
    z, _ = fixed_latents(cfg.eval_samples, cfg.z_dim, seed=cfg.seed + 1)
    with torch.no_grad():
        coverage = mode_coverage(state.ema.averaged(sampler, cfg.seed)(z), mixture)
        raw = mode_coverage(G.eval()(z), mixture)
    return {
        "config": asdict(cfg),
        "coverage": asdict(coverage),  # of the EMA generator
        "raw_coverage": asdict(raw),
        "last_step": to_floats(last),
    }
