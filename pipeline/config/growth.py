"""What the progan keys of params.yaml mean: the growth schedule, the batch at each resolution
and the real images shown before a step (model.family progan; gan/progressive.py).

The stage of every step is a pure function of the real images shown before it, and those are
a function of the step and the params alone (the global batch at each resolution x n_critic),
so a run on any number of workers at one global batch, or resumed at step k, is at the stage
the uninterrupted run was. Read by the schema's checks and by the training loop
(pipeline/training/growth.py), so both count images the same way.

Phase lengths: train.stabilise_kimg and train.fade_kimg, or, left unset, the run's steps shared
so that every phase shows the same images and the last (stabilising at the final resolution)
twice as many.

Batch per resolution (train.batch_size_per_resolution): the loader reads batches of the
greatest common divisor of the run's batch sizes and a step at resolution r joins
batch_at(r) / that of them, so the position in the data stream is also a function of the
images shown: resume reads on where the uninterrupted run did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

from gan.progressive import GrowthSchedule


def growing(params) -> bool:
    return params.model.family == "progan"


def resolutions(params) -> list[int]:
    """The resolutions a progan run trains at, start to final (the prepared one alone else)."""
    final = params.prepare.resolution
    if not growing(params):
        return [final]
    start = params.model.start_resolution
    return [start * 2**i for i in range(int(math.log2(final // start)) + 1)]


def batch_at(params, resolution: int) -> int:
    """Images per worker per D update at `resolution`."""
    t = params.train
    return (t.batch_size_per_resolution or {}).get(resolution, t.batch_size)


def loader_batch_size(params) -> int:
    """The batch the data loader reads: every step joins a whole number of them."""
    return math.gcd(*(batch_at(params, r) for r in resolutions(params)))


def global_batch_at(params, resolution: int) -> int:
    """Real images one step shows at `resolution`, across all ranks and D updates."""
    return batch_at(params, resolution) * params.ray.num_workers * params.train.n_critic


def growth_schedule(params) -> GrowthSchedule | None:
    """The run's schedule (None for families that do not grow)."""
    if not growing(params):
        return None
    t, start = params.train, params.model.start_resolution
    final = params.prepare.resolution
    stabilise = 1000 * t.stabilise_kimg if t.stabilise_kimg else None
    fade = 1000 * t.fade_kimg if t.fade_kimg else None
    if stabilise is None and fade is None:  # equal images per phase, the last twice
        phases = GrowthSchedule(start, final, 1, 1).phases()
        steps = sum(Fraction(1, global_batch_at(params, p.resolution)) for p in phases)
        steps += Fraction(1, global_batch_at(params, final))
        stabilise = t.steps / steps
    stabilise = stabilise or fade
    return GrowthSchedule(start, final, int(stabilise), int(fade or stabilise))


def images_counter(params) -> Callable[[int], int]:
    """step -> the real images D has seen before it (0-based) across all ranks, with the
    schedule worked out once (the training loop asks at every step)."""
    schedule = growth_schedule(params)
    if schedule is None:
        batch = global_batch_at(params, params.prepare.resolution)
        return lambda step: step * batch
    batches = {r: global_batch_at(params, r) for r in resolutions(params)}
    return lambda step: schedule.images_before(step, batches.__getitem__)


def images_shown(params, step: int) -> int:
    """Real images D has seen before step `step` (0-based) across all ranks."""
    return images_counter(params)(step)


def batches_before(params, step: int) -> int:
    """Loader batches one rank has read before step `step`."""
    return images_shown(params, step) // (params.ray.num_workers * loader_batch_size(params))
