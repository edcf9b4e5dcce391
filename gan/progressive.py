"""The growing schedule of progressive GANs and the reals' matching fade-in (Karras et al. 2018,
"Progressive Growing of GANs for Improved Quality, Stability, and Variation", section 3 and
appendix A.1: 800k images per fade and per stabilisation; official code train.py
`TrainingSchedule` and `process_reals`).

The stage (resolution, alpha) is a pure function of the number of real images shown, never of
steps or wall-clock: a run on 1 or 8 workers, or resumed mid-fade, grows at the same images.
Phases: stabilise at the start resolution; per doubling, fade the new resolution in (alpha
0 -> 1 linearly in images) and stabilise there; the final resolution stabilises forever.
Phases of zero images (`fade_images=0`: switch at once) are left out.

`blend_reals` gives D the reals at the current stage the way G's fade gives it fakes:
average-pooled to the stage's resolution (by repeated 2x2 pooling, as the official dataset's
levels of detail), and while fading lerp(upsample(avgpool2(x_r)), x_r, alpha).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gan.ema import unwrap
from gan.models.progan import check_alpha, check_resolutions, is_power_of_two

Tensor = torch.Tensor

STABILISE, FADE = "stabilise", "fade"


@dataclass(frozen=True)
class Stage:
    """Where growth stands: the networks' resolution, the newest block's fade-in weight (1 when
    stabilising) and the index of the phase in `GrowthSchedule.phases()`."""

    resolution: int
    alpha: float
    phase: int

    @property
    def fading(self) -> bool:
        """True during a fade-in (alpha < 1)."""
        return self.alpha < 1


@dataclass(frozen=True)
class Phase:
    """One phase of the schedule: images shown in [start, end) (end None: forever)."""

    index: int
    kind: str  # STABILISE or FADE
    resolution: int  # the resolution being stabilised, or faded in
    start: int  # images shown when the phase begins
    end: int | None  # images shown when the next phase begins; None for the last phase


def _check_count(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a whole number of images >= 0, got {value!r}")


@dataclass(frozen=True)
class GrowthSchedule:
    """Stages as a function of the real images shown (see the module header)."""

    start_resolution: int  # a power of two >= 4: the first phase's resolution
    final_resolution: int  # a power of two from 8 to 1024 (>= start_resolution)
    stabilise_images: int  # images per stabilisation phase (the paper: 800k)
    fade_images: int  # images per fade-in phase (the paper: 800k)

    def __post_init__(self):
        check_resolutions(self.final_resolution, self.start_resolution)
        _check_count("stabilise_images", self.stabilise_images)
        _check_count("fade_images", self.fade_images)

    def phases(self) -> tuple[Phase, ...]:
        """Every phase in order, with the images it spans (the last one never ends)."""
        spans = [(STABILISE, self.start_resolution, self.stabilise_images)]
        res = self.start_resolution * 2
        while res <= self.final_resolution:
            spans += [(FADE, res, self.fade_images), (STABILISE, res, self.stabilise_images)]
            res *= 2
        phases, start = [], 0
        for i, (kind, resolution, images) in enumerate(spans):
            last = i == len(spans) - 1
            if images == 0 and not last:
                continue
            end = None if last else start + images
            phases.append(Phase(len(phases), kind, resolution, start, end))
            start = start if end is None else end
        return tuple(phases)

    def images_before(self, step: int, images_per_step: Callable[[int], int]) -> int:
        """Real images shown before step `step` (0-based) when a step at a stage of resolution
        r shows `images_per_step(r)` images (ProGAN's minibatch per level of detail: the batch
        may change with the resolution). A step's stage is `at` the images before it, so a
        phase ends after the first step that reaches its end."""
        _check_count("step", step)
        shown, done = 0, 0
        for phase in self.phases():
            batch = images_per_step(phase.resolution)
            if not isinstance(batch, numbers.Integral) or isinstance(batch, bool) or batch < 1:
                raise ValueError(f"images per step at {phase.resolution} px must be >= 1, got "
                                 f"{batch!r}")  # fmt: skip
            steps = None if phase.end is None else max(0, -(-(phase.end - shown) // batch))
            if steps is None or step < done + steps:
                return shown + (step - done) * batch
            shown, done = shown + steps * batch, done + steps
        raise AssertionError("unreachable: the last phase never ends")

    def at(self, images_shown: int) -> Stage:
        """The stage after `images_shown` real images (a whole number >= 0)."""
        _check_count("images_shown", images_shown)
        for phase in self.phases():
            if phase.end is None or images_shown < phase.end:
                if phase.kind == FADE:
                    alpha = (images_shown - phase.start) / (phase.end - phase.start)
                    return Stage(phase.resolution, alpha, phase.index)
                return Stage(phase.resolution, 1.0, phase.index)
        raise AssertionError("unreachable: the last phase never ends")


def apply_stage(stage: Stage, *networks: nn.Module) -> None:
    """`set_stage(stage.resolution, stage.alpha)` on each network (DDP and torch.compile
    wrappers removed): call it with G, D and the EMA's generator whenever the stage changes."""
    for network in networks:
        inner = unwrap(network)
        if not hasattr(inner, "set_stage"):
            raise TypeError(f"{type(inner).__name__} does not grow (it has no set_stage)")
        inner.set_stage(stage.resolution, stage.alpha)


def downsample(x: Tensor, resolution: int) -> Tensor:
    """`x` (N, C, H, H) average-pooled to resolution x resolution by repeated 2x2 pooling."""
    while x.shape[-1] > resolution:
        x = F.avg_pool2d(x, 2)
    return x


def blend_reals(x: Tensor, resolution: int, alpha: float = 1.0) -> Tensor:
    """Full-resolution reals (N, C, H, H) as D sees them at stage (resolution, alpha):
    downsampled to `resolution`, and while fading (alpha < 1) lerp(upsample(avgpool2(x_r)),
    x_r, alpha), as G's output fades. At alpha 1 that is x_r (x itself at the full resolution),
    at alpha 0 upsample(avgpool2(x_r)), bitwise (the branch is taken, not the lerp)."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2] or not x.is_floating_point():
        raise ValueError(
            f"blend_reals expects floating-point images (N, C, H, H), got {x.dtype} "
            f"{tuple(x.shape)}"
        )
    size = x.shape[-1]
    valid = is_power_of_two(resolution) and resolution >= 4
    ratio = size // resolution if valid else 0
    if not valid or size % resolution or ratio < 1 or ratio & (ratio - 1):
        raise ValueError(
            f"blend_reals: resolution must be a power of two >= 4 that reaches the images' size "
            f"{size} by doublings, got {resolution!r}"
        )
    alpha = check_alpha(alpha, "blend_reals")
    if alpha < 1 and resolution < 8:
        raise ValueError(f"blend_reals: alpha must be 1 at resolution {resolution}, got {alpha}")
    current = downsample(x, resolution)
    if alpha == 1:
        return current
    low = F.interpolate(F.avg_pool2d(current, 2), scale_factor=2, mode="nearest")
    if alpha == 0:
        return low
    return torch.lerp(low, current, alpha)
