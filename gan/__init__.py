"""Pure-PyTorch GAN library: models, losses, regularizers, DiffAugment, EMA, one training step,
the 2-D mode-coverage test bed, and pickle-free generator export (`gan.export`). Imports torch
(and safetensors for weights) only, never Ray, MLflow or `pipeline`."""

from gan.augment import diff_augment
from gan.ema import GeneratorEMA
from gan.losses import LOSSES, get_loss
from gan.models import FAMILIES, build_discriminator, build_generator
from gan.regularizers import apply_spectral_norm, gradient_penalty, r1_penalty
from gan.sampling import LatentSampler, fixed_latents, generate, step_generator
from gan.step import GANTrainState, NonFiniteError, StepConfig, train_step

__all__ = [
    "FAMILIES",
    "LOSSES",
    "GANTrainState",
    "GeneratorEMA",
    "LatentSampler",
    "NonFiniteError",
    "StepConfig",
    "apply_spectral_norm",
    "build_discriminator",
    "build_generator",
    "diff_augment",
    "fixed_latents",
    "generate",
    "get_loss",
    "gradient_penalty",
    "r1_penalty",
    "step_generator",
    "train_step",
]
