"""Model families and the two factories that build a generator/discriminator pair by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from gan.models.dcgan import D_NORMS, DCGANDiscriminator, DCGANGenerator
from gan.models.layers import ConditionalBatchNorm2d
from gan.models.mlp import MLPDiscriminator, MLPGenerator
from gan.models.progan import ProGANDiscriminator, ProGANGenerator, final_state_dict
from gan.models.resnet import ResNetDiscriminator, ResNetGenerator
from gan.regularizers import apply_spectral_norm
from gan.tasks import Task, get_task, task_for


def _mlp_generator(*, channels, resolution, z_dim, width, num_classes, mlp_depth, **_):
    return MLPGenerator((channels, resolution, resolution), z_dim, width, mlp_depth, num_classes)


def _mlp_discriminator(*, channels, resolution, width, num_classes, mlp_depth, **_):
    return MLPDiscriminator((channels, resolution, resolution), width, mlp_depth, num_classes)


def _dcgan_generator(*, channels, resolution, z_dim, width, num_classes, **_):
    return DCGANGenerator(channels, resolution, z_dim, width, num_classes)


def _dcgan_discriminator(*, channels, resolution, width, num_classes, norm, **_):
    return DCGANDiscriminator(channels, resolution, width, num_classes, norm)


def _resnet_generator(*, channels, resolution, z_dim, width, num_classes, **_):
    return ResNetGenerator(channels, resolution, z_dim, width, num_classes)


def _resnet_discriminator(*, channels, resolution, width, num_classes, **_):
    return ResNetDiscriminator(channels, resolution, width, num_classes)


def _progan_generator(
    *, channels, resolution, z_dim, width, num_classes, start_resolution, growing, **_
):
    return ProGANGenerator(
        channels, resolution, z_dim, width, num_classes, start_resolution, growing
    )


def _progan_discriminator(*, channels, resolution, width, num_classes, start_resolution, **_):
    return ProGANDiscriminator(channels, resolution, width, num_classes, start_resolution)


@dataclass(frozen=True)
class Family:
    """How a model family builds its two networks from the factories' keyword arguments (each
    builder takes what it uses and ignores the rest) and which conditions they take."""

    generator: Callable[..., nn.Module]
    discriminator: Callable[..., nn.Module]
    conditions: tuple[str, ...] = ("none", "label")  # gan.tasks.CONDITIONS the networks take


FAMILY_TABLE: dict[str, Family] = {
    "mlp": Family(_mlp_generator, _mlp_discriminator),  # vanilla GAN / concatenation cGAN
    "dcgan": Family(_dcgan_generator, _dcgan_discriminator),  # Radford et al. 2016
    "resnet": Family(_resnet_generator, _resnet_discriminator),  # SNGAN (Miyato et al. 2018)
    "progan": Family(_progan_generator, _progan_discriminator),  # Karras et al. 2018
}
FAMILIES = tuple(FAMILY_TABLE)
# The conditions (gan.tasks.CONDITIONS) each family's networks take: a new task runs on the
# families that list its condition.
FAMILY_CONDITIONS = {family: entry.conditions for family, entry in FAMILY_TABLE.items()}

__all__ = [
    "D_NORMS",
    "FAMILIES",
    "FAMILY_CONDITIONS",
    "FAMILY_TABLE",
    "Family",
    "GeneratorSpec",
    "ConditionalBatchNorm2d",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLPDiscriminator",
    "MLPGenerator",
    "ProGANDiscriminator",
    "ProGANGenerator",
    "ResNetDiscriminator",
    "ResNetGenerator",
    "build_discriminator",
    "build_generator",
    "final_state_dict",
]


def _family(family: str) -> Family:
    try:
        return FAMILY_TABLE[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}") from None


def build_generator(
    family: str,
    *,
    channels: int,
    resolution: int,
    z_dim: int = 128,
    width: int = 64,
    num_classes: int = 0,
    mlp_depth: int = 3,
    spectral_norm: bool = False,
    start_resolution: int = 4,
    growing: bool = True,
) -> nn.Module:
    """An image generator (shape channels x resolution x resolution; outputs in [-1, 1], but
    progan's output is linear: consumers clamp). `mlp_depth` applies to mlp only;
    `start_resolution` and `growing` to progan only (a growing generator starts at the final
    stage; `growing=False`: the final resolution's layers only, what GeneratorSpec builds)."""
    g = _family(family).generator(
        channels=channels, resolution=resolution, z_dim=z_dim, width=width,
        num_classes=num_classes, mlp_depth=mlp_depth, start_resolution=start_resolution,
        growing=growing,
    )  # fmt: skip
    return apply_spectral_norm(g, exclude=(ConditionalBatchNorm2d,)) if spectral_norm else g


def build_discriminator(
    family: str,
    *,
    channels: int,
    resolution: int,
    width: int = 64,
    num_classes: int = 0,
    mlp_depth: int = 3,
    norm: str = "batch",
    spectral_norm: bool = True,
    start_resolution: int = 4,
) -> nn.Module:
    """An image discriminator returning one logit per sample. `norm` applies to DCGAN only,
    `mlp_depth` to mlp only, `start_resolution` to progan only (which has no normalisation
    layers and starts at the final stage)."""
    d = _family(family).discriminator(
        channels=channels, resolution=resolution, width=width, num_classes=num_classes,
        mlp_depth=mlp_depth, norm=norm, start_resolution=start_resolution,
    )  # fmt: skip
    return apply_spectral_norm(d) if spectral_norm else d


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to rebuild a generator from its weights alone (saved as JSON beside
    them in checkpoints, evaluation results and registered models)."""

    family: str
    channels: int
    resolution: int
    z_dim: int
    width: int
    num_classes: int = 0
    mlp_depth: int = 3
    spectral_norm: bool = False
    task: str = ""  # a key of gan.tasks.TASKS; "" (specs saved before tasks): from num_classes

    def __post_init__(self):
        task = get_task(self.task) if self.task else task_for(self.num_classes > 0)
        task.check_available()
        if task.condition not in FAMILY_CONDITIONS.get(self.family, (task.condition,)):
            raise ValueError(f"model family {self.family!r} does not take task {task.name!r}")
        if (task.condition == "label") != (self.num_classes > 0):
            raise ValueError(
                f"task {task.name} with num_classes {self.num_classes}: a class-conditional "
                "generator has classes, others have none"
            )
        object.__setattr__(self, "task", task.name)

    @property
    def task_entry(self) -> Task:
        return get_task(self.task)

    def build(self) -> nn.Module:
        return build_generator(
            self.family, channels=self.channels, resolution=self.resolution, z_dim=self.z_dim,
            width=self.width, num_classes=self.num_classes, mlp_depth=self.mlp_depth,
            spectral_norm=self.spectral_norm, growing=False,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)
