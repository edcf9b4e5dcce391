"""Model families and the two factories that build a generator/discriminator pair by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from gan.models.dcgan import D_NORMS, DCGANDiscriminator, DCGANGenerator
from gan.models.layers import ConditionalBatchNorm2d
from gan.models.mlp import MLPDiscriminator, MLPGenerator
from gan.models.resnet import ResNetDiscriminator, ResNetGenerator
from gan.regularizers import apply_spectral_norm
from gan.tasks import Task, get_task, task_for

FAMILIES = ("mlp", "dcgan", "resnet")
# The conditions (gan.tasks.CONDITIONS) each family's networks take: a new task runs on the
# families that list its condition.
FAMILY_CONDITIONS = {family: ("none", "label") for family in FAMILIES}

__all__ = [
    "D_NORMS",
    "FAMILIES",
    "GeneratorSpec",
    "ConditionalBatchNorm2d",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLPDiscriminator",
    "MLPGenerator",
    "ResNetDiscriminator",
    "ResNetGenerator",
    "build_discriminator",
    "build_generator",
]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


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
) -> nn.Module:
    """An image generator (outputs in [-1, 1], shape channels x resolution x resolution)."""
    _check_family(family)
    if family == "mlp":
        g = MLPGenerator((channels, resolution, resolution), z_dim, width, mlp_depth, num_classes)
    elif family == "dcgan":
        g = DCGANGenerator(channels, resolution, z_dim, width, num_classes)
    else:
        g = ResNetGenerator(channels, resolution, z_dim, width, num_classes)
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
) -> nn.Module:
    """An image discriminator returning one logit per sample. `norm` applies to DCGAN only."""
    _check_family(family)
    if family == "mlp":
        d = MLPDiscriminator((channels, resolution, resolution), width, mlp_depth, num_classes)
    elif family == "dcgan":
        d = DCGANDiscriminator(channels, resolution, width, num_classes, norm)
    else:
        d = ResNetDiscriminator(channels, resolution, width, num_classes)
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
            spectral_norm=self.spectral_norm,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)
