"""Adversarial losses, each a pair of functions of the discriminator's raw outputs (logits).

Every loss is a mean over the batch. `d_loss(real, fake)` is minimised by the discriminator,
`g_loss(fake)` by the generator. Sources:
- bce: Goodfellow et al. 2014, "Generative Adversarial Nets", with the non-saturating
  generator loss -log D(G(z)) from section 3 of the same paper.
- lsgan: Mao et al. 2017, "Least Squares Generative Adversarial Networks", eq. 2 with the
  0-1 coding (a=0, b=1, c=1) of section 3.2.
- hinge: Lim & Ye 2017, "Geometric GAN"; as used by Miyato et al. 2018 (SNGAN) eq. 16-17.
- wasserstein: Arjovsky et al. 2017, "Wasserstein GAN" (the critic needs a Lipschitz
  constraint: a gradient penalty, Gulrajani et al. 2017, or spectral normalisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def bce_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """-log D(x) - log(1 - D(G(z))) with D = sigmoid(logit), computed stably."""
    return (F.softplus(-real) + F.softplus(fake)).mean()


def bce_g_loss(fake: Tensor) -> Tensor:
    """Non-saturating generator loss -log D(G(z))."""
    return F.softplus(-fake).mean()


def lsgan_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """1/2 (D(x) - 1)^2 + 1/2 D(G(z))^2."""
    return 0.5 * ((real - 1).square() + fake.square()).mean()


def lsgan_g_loss(fake: Tensor) -> Tensor:
    """1/2 (D(G(z)) - 1)^2."""
    return 0.5 * (fake - 1).square().mean()


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """max(0, 1 - D(x)) + max(0, 1 + D(G(z)))."""
    return (F.relu(1 - real) + F.relu(1 + fake)).mean()


def hinge_g_loss(fake: Tensor) -> Tensor:
    """-D(G(z))."""
    return -fake.mean()


def wasserstein_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """D(G(z)) - D(x): the negated Kantorovich-Rubinstein estimate."""
    return fake.mean() - real.mean()


def wasserstein_g_loss(fake: Tensor) -> Tensor:
    """-D(G(z))."""
    return -fake.mean()


@dataclass(frozen=True)
class GANLoss:
    """A named pair of discriminator and generator losses."""

    name: str
    d_loss: Callable[[Tensor, Tensor], Tensor]
    g_loss: Callable[[Tensor], Tensor]


LOSSES: dict[str, GANLoss] = {
    "bce": GANLoss("bce", bce_d_loss, bce_g_loss),
    "lsgan": GANLoss("lsgan", lsgan_d_loss, lsgan_g_loss),
    "hinge": GANLoss("hinge", hinge_d_loss, hinge_g_loss),
    "wasserstein": GANLoss("wasserstein", wasserstein_d_loss, wasserstein_g_loss),
}


def get_loss(name: str) -> GANLoss:
    """The loss registered under `name`; a clear error lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown GAN loss {name!r}; expected one of {sorted(LOSSES)}") from None
