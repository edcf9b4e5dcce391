"""gan.progressive: the growing schedule (a pure function of the images shown) and the reals'
fade-in (blend_reals)."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from gan.progressive import FADE, STABILISE, GrowthSchedule, Phase, Stage, blend_reals


def test_phases_and_their_image_ranges():
    schedule = GrowthSchedule(4, 32, stabilise_images=100, fade_images=50)
    assert schedule.phases() == (
        Phase(0, STABILISE, 4, 0, 100),
        Phase(1, FADE, 8, 100, 150),
        Phase(2, STABILISE, 8, 150, 250),
        Phase(3, FADE, 16, 250, 300),
        Phase(4, STABILISE, 16, 300, 400),
        Phase(5, FADE, 32, 400, 450),
        Phase(6, STABILISE, 32, 450, None),  # the final resolution stabilises forever
    )


@pytest.mark.parametrize(
    "images, expected",
    [
        (0, Stage(4, 1.0, 0)),
        (99, Stage(4, 1.0, 0)),
        (100, Stage(8, 0.0, 1)),  # a fade starts at alpha 0
        (125, Stage(8, 0.5, 1)),
        (149, Stage(8, 0.98, 1)),
        (150, Stage(8, 1.0, 2)),  # and its end is the next stabilisation
        (260, Stage(16, 0.2, 3)),
        (449, Stage(32, 0.98, 5)),
        (450, Stage(32, 1.0, 6)),
        (10**12, Stage(32, 1.0, 6)),
    ],
)
def test_the_stage_at_phase_boundaries_and_mid_fade(images, expected):
    stage = GrowthSchedule(4, 32, stabilise_images=100, fade_images=50).at(images)
    assert stage == expected
    assert stage.fading == (expected.alpha < 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.alpha = 0.5


def test_the_stage_depends_on_images_only():
    schedule = GrowthSchedule(8, 64, stabilise_images=600, fade_images=600)
    assert list(inspect.signature(schedule.at).parameters) == ["images_shown"]
    # 1 worker at batch 48 and 4 workers at batch 16 (64 images a step): the same images give
    # the same stage at every step they share
    one = {48 * step: schedule.at(48 * step) for step in range(200)}
    four = {64 * step: schedule.at(64 * step) for step in range(150)}
    shared = one.keys() & four.keys()
    assert len(shared) > 40 and all(one[i] == four[i] for i in shared)
    assert schedule.at(7200) == GrowthSchedule(8, 64, 600, 600).at(7200)  # no hidden state


def test_a_schedule_without_fades_or_without_growth():
    snap = GrowthSchedule(4, 16, stabilise_images=10, fade_images=0)
    assert [(p.kind, p.resolution, p.start, p.end) for p in snap.phases()] == [
        (STABILISE, 4, 0, 10),
        (STABILISE, 8, 10, 20),
        (STABILISE, 16, 20, None),
    ]
    assert snap.at(10) == Stage(8, 1.0, 1)
    still = GrowthSchedule(32, 32, stabilise_images=10, fade_images=10)
    assert still.phases() == (Phase(0, STABILISE, 32, 0, None),)
    assert still.at(10**6) == Stage(32, 1.0, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start_resolution=3), "start_resolution must be a power of two from 4"),
        (dict(start_resolution=64), "start_resolution must be a power of two from 4"),
        (dict(final_resolution=48), "power-of-two resolution from 8 to 1024"),
        (dict(final_resolution=2048), "power-of-two resolution from 8 to 1024"),
        (dict(stabilise_images=-1), "stabilise_images must be a whole number of images >= 0"),
        (dict(fade_images=1.5), "fade_images must be a whole number of images >= 0"),
        (dict(fade_images=True), "fade_images must be a whole number"),
    ],
)
def test_schedule_arguments_are_checked(kwargs, message):
    args = dict(start_resolution=4, final_resolution=32, stabilise_images=10, fade_images=10)
    with pytest.raises(ValueError, match=message):
        GrowthSchedule(**(args | kwargs))


def test_images_shown_is_checked():
    schedule = GrowthSchedule(4, 32, 10, 10)
    for bad in (-1, 2.0, None):
        with pytest.raises(ValueError, match="images_shown must be a whole number"):
            schedule.at(bad)


def test_blend_reals_at_the_ends_and_mid_fade():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 32, 32) * 2 - 1
    x8 = F.avg_pool2d(F.avg_pool2d(x, 2), 2)  # repeated 2x2 pooling
    assert torch.equal(blend_reals(x, 8, 1.0), x8)
    assert torch.equal(blend_reals(x, 8), x8)
    assert blend_reals(x, 32, 1.0) is x  # the full resolution is the reals themselves
    low = F.interpolate(F.avg_pool2d(x8, 2), scale_factor=2, mode="nearest")
    assert torch.equal(blend_reals(x, 8, 0.0), low)
    assert torch.equal(blend_reals(x, 8, 0.25), torch.lerp(low, x8, 0.25))
    # by hand at one pixel: the 4 px image pixel (0, 0) averages the 8x8 corner of the 32 px one
    block = x[0, 0, :8, :8].mean()
    mid = blend_reals(x, 8, 0.25)[0, 0, 0, 0]
    assert torch.allclose(mid, 0.75 * block + 0.25 * x8[0, 0, 0, 0], atol=1e-6)
    assert torch.allclose(blend_reals(x, 8, 0.0).mean(), x.mean(), atol=1e-6)  # means kept


@pytest.mark.parametrize(
    "x, resolution, alpha, message",
    [
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), 8, 1.0, "floating-point images"),
        (torch.zeros(2, 16, 16), 8, 1.0, "floating-point images"),
        (torch.zeros(2, 1, 16, 8), 8, 1.0, "floating-point images"),
        (torch.zeros(2, 1, 16, 16), 32, 1.0, "reaches the images' size 16"),
        (torch.zeros(2, 1, 16, 16), 6, 1.0, "power of two >= 4"),
        (torch.zeros(2, 1, 16, 16), 8, 1.5, r"alpha must be a number in \[0, 1\]"),
        (torch.zeros(2, 1, 16, 16), 4, 0.5, "alpha must be 1 at resolution 4"),
    ],
)
def test_blend_reals_checks_its_arguments(x, resolution, alpha, message):
    with pytest.raises(ValueError, match=message):
        blend_reals(x, resolution, alpha)


def test_images_before_a_step_follow_the_batch_of_each_resolution():
    schedule = GrowthSchedule(4, 16, stabilise_images=100, fade_images=50)
    batch = {4: 40, 8: 20, 16: 10}.__getitem__
    # 4 px: steps 0-2 (0, 40, 80); fade 8 px from 120 (past 100: a phase ends after the step
    # that reaches its end): steps 3-4 (120, 140), stabilise 8 from 160: steps 5-9 (..., 240),
    # fade 16 px: steps 10-13 (260, ..., 290), stabilise 16 px from 300 (steps 14 on)
    shown = [schedule.images_before(k, batch) for k in range(20)]
    assert shown == [0, 40, 80, 120, 140, 160, 180, 200, 220, 240, 260, 270, 280, 290, 300, 310,
                     320, 330, 340, 350]  # fmt: skip
    assert [schedule.at(i).resolution for i in shown[:6]] == [4, 4, 4, 8, 8, 8]
    constant = [schedule.images_before(k, lambda r: 32) for k in range(50)]
    assert constant == [32 * k for k in range(50)]  # one batch: step x batch, as before
    with pytest.raises(ValueError, match="images per step at 4 px must be >= 1, got 0"):
        schedule.images_before(3, lambda r: 0)
