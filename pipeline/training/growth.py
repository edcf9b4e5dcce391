"""Progressive growing in the training loop (model.family progan, gan/progressive.py).

The stage (resolution, fade-in alpha) of every step is a pure function of the real images
shown before it (pipeline/config/growth.py: the step, the global batch at each resolution and
n_critic), so it is the same for any number of workers at one global batch, and a run resumed
at step k is at the stage the uninterrupted run was. The stage is applied to G, D and the EMA
copy before each step; every real batch is reduced to the stage's resolution and, while fading,
blended like the fakes (gan.progressive.blend_reals); the ranks read full-resolution shards and
reduce on the fly, no re-prepare. With train.batch_size_per_resolution a step's batch joins
as many loader batches as its resolution takes.

Adam's moments are reset at every phase boundary (a fade-in starts, a fade-in ends), as the
paper's code does (tkarras/progressive_growing_of_gans, train.py: reset_opt_for_new_lod): the
moments of layers that were fading in do not carry over. Whether step k starts a phase is
decided from the schedule (stage of k-1 against stage of k), never from what the loop last
saw, so a resumed run resets exactly where the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gan.progressive import GrowthSchedule, Stage, apply_stage, blend_reals
from pipeline.config import Params
from pipeline.config.growth import batch_at, images_counter, loader_batch_size


class Growth:
    """Applies the schedule's stage to the networks and the real batches, step by step."""

    def __init__(self, params: Params, schedule: GrowthSchedule, networks, optimizers):
        self.params, self.schedule = params, schedule
        self.networks = networks  # G, D, the EMA copy
        self.optimizers = optimizers
        self.stage: Stage | None = None
        self._shown = images_counter(params)

    def stage_at(self, step: int) -> Stage:
        return self.schedule.at(self._shown(step))

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
        """The current stage's real batches: as many loader batches as its resolution's batch
        takes, joined, at the stage's resolution and blended while fading."""
        loader_batch = loader_batch_size(self.params)
        for images, labels in batches:
            stage = self.stage
            parts = batch_at(self.params, stage.resolution) // loader_batch
            if parts > 1:
                more = [next(batches) for _ in range(parts - 1)]
                images = torch.cat([images, *(m[0] for m in more)])
                labels = None if labels is None else torch.cat([labels, *(m[1] for m in more)])
            yield blend_reals(images, stage.resolution, stage.alpha), labels


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
