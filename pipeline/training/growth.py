"""Progressive growing in the training loop (model.family progan, gan/progressive.py).

The stage (resolution, fade-in alpha) of every step is a pure function of the real images
shown before it: step x global batch x n_critic, so it is the same for any number of workers
at one global batch, and a run resumed at step k is at the stage the uninterrupted run was.
The stage is applied to G, D and the EMA copy before each step; every real batch is reduced
to the stage's resolution and, while fading, blended like the fakes (gan.progressive.
blend_reals); the ranks read full-resolution shards and reduce on the fly, no re-prepare.

Adam's moments are reset at every phase boundary (a fade-in starts, a fade-in ends), as the
paper's code does (tkarras/progressive_growing_of_gans, train.py: reset_opt_for_new_lod): the
moments of layers that were fading in do not carry over. Whether step k starts a phase is
decided from the schedule (stage of k-1 against stage of k), never from what the loop last
saw, so a resumed run resets exactly where the uninterrupted one did.

Phase lengths: train.stabilise_kimg and train.fade_kimg, or, left unset, the run's images
shared equally by the phases with the last (stabilising at the final resolution) twice as
long.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from gan.progressive import GrowthSchedule, Stage, apply_stage, blend_reals
from pipeline.config import Params


def growth_schedule(params: Params) -> GrowthSchedule | None:
    """The run's schedule (None for families that do not grow)."""
    if params.model.family != "progan":
        return None
    t, start = params.train, params.model.start_resolution
    final = params.prepare.resolution
    phases = 1 + 2 * int(math.log2(final // start))
    share = images_shown(params, t.steps) / (phases + 1)  # the last phase twice
    stabilise = 1000 * t.stabilise_kimg if t.stabilise_kimg else None
    fade = 1000 * t.fade_kimg if t.fade_kimg else None
    stabilise = stabilise or fade or share
    return GrowthSchedule(start, final, int(stabilise), int(fade or stabilise))


def images_shown(params: Params, step: int) -> int:
    """Real images D has seen before step `step` (0-based) across all ranks."""
    t = params.train
    return step * t.batch_size * params.ray.num_workers * t.n_critic


class Growth:
    """Applies the schedule's stage to the networks and the real batches, step by step."""

    def __init__(self, params: Params, schedule: GrowthSchedule, networks, optimizers):
        self.params, self.schedule = params, schedule
        self.networks = networks  # G, D, the EMA copy
        self.optimizers = optimizers
        self.stage: Stage | None = None

    def stage_at(self, step: int) -> Stage:
        return self.schedule.at(images_shown(self.params, step))

    def before_step(self, step: int) -> Stage:
        """Set the networks to step `step`'s stage; reset Adam where a phase starts."""
        stage = self.stage_at(step)
        if stage != self.stage:
            apply_stage(stage, *self.networks)
            self.stage = stage
        if step > 0 and self.stage_at(step - 1).phase != stage.phase:
            for optimizer in self.optimizers:
                optimizer.state.clear()
        return stage

    def reals(self, batches: Iterator) -> Iterator:
        """The loader's batches at the current stage's resolution, blended while fading."""
        for images, labels in batches:
            stage = self.stage
            yield blend_reals(images, stage.resolution, stage.alpha), labels

    def at_final(self, step: int) -> bool:
        """Whether step `step` trains the final resolution fully faded in."""
        stage = self.stage_at(step)
        return stage.resolution == self.schedule.final_resolution and stage.alpha == 1.0


class AtFinalSize(torch.nn.Module):
    """A growing generator whose samples are shown at the final resolution (nearest): what a
    sweep's trial evaluation scores, so that FID against the final-resolution reals can be
    computed at every stage (a lower stage's blur costs it FID; trials compare fairly at the
    same images shown, which ASHA's milestones are in steps of one global batch)."""

    def __init__(self, generator: torch.nn.Module, resolution: int):
        super().__init__()
        self.generator, self.resolution = generator, resolution

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return upsampled(self.generator(z, labels), self.resolution)


def upsampled(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images shown at `resolution` (nearest neighbour), for grids comparable across stages."""
    if images.shape[-1] == resolution:
        return images
    return torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="nearest")
