"""Discriminator regularizers: gradient penalty, R1 penalty and spectral normalisation.

- gradient_penalty: Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", eq. 3:
  E[(||grad D(x_hat)||_2 - 1)^2] on random interpolates x_hat of real and fake samples.
- r1_penalty: Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?",
  eq. 9: E[||grad D(x)||^2] on real data (the caller multiplies by gamma / 2). Lazy
  regularisation (Karras et al. 2020, StyleGAN2, section 3.1) evaluates it every k steps and
  scales it by k, which is what `r1_every` in the training step does.
- apply_spectral_norm: Miyato et al. 2018, "Spectral Normalization for GANs".
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def _input_gradient(outputs: Tensor, inputs: Tensor) -> Tensor:
    """d(sum outputs)/d inputs, kept in the graph so the penalty itself can be trained on."""
    (grad,) = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad.flatten(start_dim=1)


def gradient_penalty(
    discriminator: nn.Module,
    real: Tensor,
    fake: Tensor,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP penalty on interpolates; `generator` draws the mixing weights reproducibly."""
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(alpha_shape, generator=generator).to(real.device, real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    grad = _input_gradient(discriminator(mixed, labels), mixed)
    return (grad.norm(2, dim=1) - 1).square().mean()


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """Squared gradient norm of D at the real samples; `real` must require grad."""
    return _input_gradient(real_logits, real).square().sum(dim=1).mean()


SPECTRAL_NORM_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)


def apply_spectral_norm(module: nn.Module, exclude: tuple[type[nn.Module], ...] = ()) -> nn.Module:
    """Spectrally normalise every linear, convolution and embedding layer of `module` in place.

    Layers inside a module of an `exclude` type are left alone: the per-class scale and shift
    tables of conditional BatchNorm are normalisation parameters, not weights (a zero-initialised
    shift table has spectral norm 0, and normalising it gives NaN).
    """
    skipped = {id(sub) for m in module.modules() if isinstance(m, exclude) for sub in m.modules()}
    for layer in list(module.modules()):
        if isinstance(layer, SPECTRAL_NORM_LAYERS) and id(layer) not in skipped:
            # Transposed convolutions keep their output channels in dim 1.
            dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
            nn.utils.parametrizations.spectral_norm(layer, dim=dim)
    return module
