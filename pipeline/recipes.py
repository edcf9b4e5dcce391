"""Recipes: model and training defaults that suit the images `prepare` makes.

A user who points `prepare` at their own images and changes nothing else should get a generator
that beats the plain DCGAN script they would otherwise write, at the same wall-clock. Which
settings do that depends on the resolution, so the defaults of the keys below come from the
first recipe whose `max_resolution` covers `prepare.resolution` when a key is left out or set to
`auto` (the shipped params.yaml lists them as `auto`, so that `dvc exp run -S train.lr_g=...`
finds the key to override); a value set in params.yaml (or with --set, -S, or a sweep) wins.
`ganpipe validate` prints what a params file resolves to, and the recipe's name is recorded
with every run (the `ganpipe.recipe` tag).

Chosen by measurement on 2 CPUs (bench/RESULTS.md, "Quality per compute"): at 32 px the
classic objective (Radford et al. 2016: BCE, BatchNorm in D, Adam (0.5, 0.999)) with
half-width networks made 2.5x the steps of the width-64 script in the same time and reached
less than half its domain FID on CIFAR-10; the hinge loss with a spectrally normalised D, at
either width, did worse there; a higher learning rate (5e-4) and DiffAugment's translation
did better still on small datasets (digits, CIFAR-10's 8,000-image subset). At 16 px it is
the other way round: on digits the classic objective collapsed (domain FID 86 at width 64,
46 at width 32, where hinge + spectral norm reached 13), so the pipeline's first defaults
stay, as they do above 32 px, where nothing was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Defaults for `model.*` and `train.*` keys, for resolutions up to `max_resolution`."""

    name: str
    max_resolution: int
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> key -> value


SNGAN_HINGE_64 = {  # the pipeline's first defaults: hinge loss, spectral-norm D (Miyato 2018)
    "model": {"d_norm": "none", "spectral_norm_d": True, "z_dim": 64, "g_width": 64, "d_width": 64},
    "train": {
        "loss": "hinge",
        "beta1": 0.0,
        "beta2": 0.9,
        "lr_g": 2e-4,
        "lr_d": 2e-4,
        "steps": 1000,
        "batch_size": 128,
        "diffaugment": (),
    },  # fmt: skip
}
DCGAN_CLASSIC_32 = {  # Radford et al. 2016's objective and optimiser, half the width
    "model": {
        "d_norm": "batch",
        "spectral_norm_d": False,
        "z_dim": 100,
        "g_width": 32,
        "d_width": 32,
    },  # fmt: skip
    # half the batch, three times the steps: about 4 minutes on 2 CPUs (measured: FID falls
    # from 26 to 9 on CIFAR-10 between 1,000 steps of 128 images and 3,000 of 64); Adam 5e-4
    # and DiffAugment translation (Zhao et al. 2020; measured, 240 s on digits 32 px: FID 7.5
    # at 2e-4, 5.2 at 5e-4, 4.7 at 5e-4 with translation; translation + cutout 9.8 at 2e-4)
    "train": {
        "loss": "bce",
        "beta1": 0.5,
        "beta2": 0.999,
        "lr_g": 5e-4,
        "lr_d": 5e-4,
        "steps": 3000,
        "batch_size": 64,
        "diffaugment": ("translation",),
    },  # fmt: skip
}
# Progressive growing (Karras et al. 2018, appendix A.1): WGAN-GP (lambda 10) with the drift
# term 0.001, Adam lr 1e-3 and betas (0, 0.99), no normalisation in D (the family has none).
# Widths 32, the DCGAN recipes' (the paper's 512 is for GPUs: set model.g_width / d_width);
# measured on 2 CPUs at 32 px (bench/RESULTS.md): 101 images/s at width 32, 35 at 64, 5.9 at
# 128. Phase lengths: the run's images shared out (pipeline/config/growth.py).
PROGAN_WGANGP = {
    "model": {"d_norm": "none", "spectral_norm_d": False, "z_dim": 128, "g_width": 32,
              "d_width": 32},
    "train": {
        "loss": "wasserstein",
        "gp_weight": 10.0,
        "drift_weight": 0.001,
        "beta1": 0.0,
        "beta2": 0.99,
        "lr_g": 1e-3,
        "lr_d": 1e-3,
        "steps": 2000,
        "batch_size": 64,
        "diffaugment": (),
    },
}  # fmt: skip
# Families with a recipe of their own, whatever the resolution.
FAMILY_RECIPES = {"progan": Recipe("progan-wgangp", 1024, PROGAN_WGANGP)}
RECIPES = (
    Recipe("sngan-hinge-64", 16, SNGAN_HINGE_64),
    Recipe("dcgan-classic-32", 32, DCGAN_CLASSIC_32),
    Recipe("sngan-hinge-64", 1024, SNGAN_HINGE_64),
)


RECIPE_NOTE = "; default: the recipe for prepare.resolution (shown: all but 32 px)"


def recipe_default(section: str, key: str) -> Any:
    """The schema's stated default of a recipe key: the first recipe's (the default prepare's)."""
    return RECIPES[0].values[section][key]


def recipe_for(resolution: int, family: str = "dcgan") -> Recipe:
    """The recipe for `family` at images of `resolution` pixels square."""
    if family in FAMILY_RECIPES:
        return FAMILY_RECIPES[family]
    for recipe in RECIPES:
        if resolution <= recipe.max_resolution:
            return recipe
    return RECIPES[-1]


AUTO = "auto"  # a recipe key's value that asks for the recipe's


def with_recipe(raw: dict, resolution: int) -> dict:
    """A copy of the raw params mapping with every recipe key it leaves out or sets to `auto`
    filled from the recipe for `resolution` (or model.family's own, FAMILY_RECIPES). Sections
    that are not mappings are left for the schema to report."""
    filled = dict(raw)
    model = raw.get("model")
    family = model.get("family", "dcgan") if isinstance(model, dict) else "dcgan"
    recipe = recipe_for(resolution, family if isinstance(family, str) else "")
    for section, values in recipe.values.items():
        given = filled.get(section)
        if given is not None and not isinstance(given, dict):
            continue
        merged = dict(given or {})
        for key, value in values.items():
            if merged.get(key, AUTO) == AUTO:
                merged[key] = value
        filled[section] = merged
    return filled
