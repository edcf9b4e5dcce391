import math

import pytest
import torch

from gan.ema import GeneratorEMA
from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, NonFiniteError, StepConfig, train_step

EXPECTED_KEYS = {
    "loss_d", "loss_g", "gp", "r1", "grad_norm_d", "grad_norm_g",
    "d_real", "d_fake", "d_real_logit", "d_fake_logit",
}  # fmt: skip


def make_state(num_classes=0, family="dcgan", seed=0, norm="none"):
    torch.manual_seed(seed)
    g = build_generator(family, channels=1, resolution=8, z_dim=8, width=8, num_classes=num_classes)
    d = build_discriminator(
        family, channels=1, resolution=8, width=8, num_classes=num_classes, norm=norm
    )
    return GANTrainState(
        generator=g,
        discriminator=d,
        opt_g=torch.optim.Adam(g.parameters(), 1e-3, betas=(0.0, 0.9)),
        opt_d=torch.optim.Adam(d.parameters(), 1e-3, betas=(0.0, 0.9)),
        ema=GeneratorEMA(g, half_life_images=1, images_per_step=1, rampup=None),  # beta 0.5
    )


def batches(num_classes=0, seed=1):
    rng = torch.Generator().manual_seed(seed)
    while True:
        x = torch.rand(6, 1, 8, 8, generator=rng) * 2 - 1
        y = torch.randint(0, num_classes, (6,), generator=rng) if num_classes else None
        yield x, y


def run(state, cfg, steps=3, num_classes=0, seed=0):
    data = batches(num_classes)
    sampler = LatentSampler(8, num_classes)
    return [
        train_step(state, data, cfg, sampler, step_generator(seed, 0, step), step)
        for step in range(steps)
    ]


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("loss", ["bce", "lsgan", "hinge", "wasserstein"])
def test_step_returns_finite_floats_and_updates_both_networks(loss):
    state = make_state()
    g0, d0 = weights(state.generator), weights(state.discriminator)
    (metrics,) = run(state, StepConfig(loss=loss), steps=1)
    assert set(metrics) == EXPECTED_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["d_real"] < 1 and 0 < metrics["d_fake"] < 1
    assert all(not torch.equal(a, b) for a, b in zip(g0, weights(state.generator), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d0, weights(state.discriminator), strict=True))


def test_n_critic_discriminator_updates_per_generator_update():
    state = make_state()
    run(state, StepConfig(loss="wasserstein", n_critic=3, gp_weight=10), steps=2)
    d_steps = {int(s["step"]) for s in state.opt_d.state.values()}
    g_steps = {int(s["step"]) for s in state.opt_g.state.values()}
    assert d_steps == {6} and g_steps == {2}


def test_generator_phase_leaves_discriminator_gradients_alone():
    state = make_state()
    (metrics,) = run(state, StepConfig(loss="hinge"), steps=1)
    grads = [p.grad for p in state.discriminator.parameters() if p.grad is not None]
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(metrics["grad_norm_d"])
    assert all(p.requires_grad for p in state.discriminator.parameters())


def test_penalties_are_reported_and_r1_is_lazy():
    state = make_state()
    steps = run(state, StepConfig(loss="bce", r1_gamma=1.0, r1_every=2, gp_weight=1.0), steps=4)
    assert all(s["gp"] > 0 for s in steps)
    assert [s["r1"] > 0 for s in steps] == [True, False, True, False]


def test_lazy_r1_is_scaled_by_its_interval():
    """At an R1 step, gamma with every=2 must update D exactly like 2 x gamma with every=1."""
    lazy, eager, unscaled = make_state(), make_state(), make_state()
    run(lazy, StepConfig(loss="bce", r1_gamma=1.0, r1_every=2), steps=1)
    run(eager, StepConfig(loss="bce", r1_gamma=2.0, r1_every=1), steps=1)
    run(unscaled, StepConfig(loss="bce", r1_gamma=1.0, r1_every=1), steps=1)
    lazy_d, eager_d = weights(lazy.discriminator), weights(eager.discriminator)
    for a, b in zip(lazy_d, eager_d, strict=True):
        torch.testing.assert_close(a, b)
    assert any(
        not torch.allclose(a, b)
        for a, b in zip(lazy_d, weights(unscaled.discriminator), strict=True)
    )


def test_same_seed_gives_the_same_weights():
    cfg = StepConfig(loss="hinge", diffaugment=("color", "translation", "cutout"))
    a, b = make_state(), make_state()
    run(a, cfg)
    run(b, cfg)
    for x, y in zip(weights(a.generator), weights(b.generator), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("policy", [(), ("translation", "cutout")])
def test_discriminator_sees_augmented_reals_and_fakes_only_with_a_policy(policy):
    state = make_state()
    seen = []
    state.discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    real, _ = next(batches())
    run(state, StepConfig(loss="hinge", diffaugment=policy), steps=1)
    assert len(seen) == 3  # real and fake in the D phase, fake in the G phase
    assert torch.equal(seen[0], real) == (not policy)
    if policy:  # cutout zeroes at least a 2x2 corner of every image, real and fake alike
        for images in seen:
            assert ((images == 0).flatten(1).sum(dim=1) >= 4).all()


def test_conditional_step():
    state = make_state(num_classes=4, family="resnet")
    (metrics,) = run(state, StepConfig(loss="hinge", r1_gamma=0.1), steps=1, num_classes=4)
    assert set(metrics) == EXPECTED_KEYS and math.isfinite(metrics["r1"])


def test_ema_blends_each_generator_update_with_its_decay():
    state = make_state()  # EMA beta 0.5 (a half-life of one step), no ramp-up
    expected = weights(state.ema.model)
    data, sampler = batches(), LatentSampler(8)
    for step in range(2):
        train_step(state, data, StepConfig(loss="hinge"), sampler, step_generator(0, 0, step), step)
        expected = [
            0.5 * e + 0.5 * g for e, g in zip(expected, weights(state.generator), strict=True)
        ]
    for a, b in zip(weights(state.ema.model), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_non_finite_discriminator_update_is_reported_not_stepped():
    state = make_state()
    with torch.no_grad():
        next(state.discriminator.parameters()).view(-1)[0] = float("nan")
    d_before = weights(state.discriminator)
    with pytest.raises(NonFiniteError, match="diverged at step 0: non-finite d update") as info:
        run(state, StepConfig(loss="bce"), steps=1)
    assert info.value.step == 0 and info.value.phase == "d"
    assert not state.opt_d.state  # the optimiser never stepped
    for a, b in zip(d_before, weights(state.discriminator), strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_non_finite_generator_gradient_is_reported():
    state = make_state()
    for p in state.generator.parameters():
        p.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite g update") as info:
        run(state, StepConfig(loss="hinge"), steps=1)
    assert info.value.phase == "g" and not state.opt_g.state
    assert math.isfinite(info.value.values["loss_g"])


def test_step_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown GAN loss"):
        StepConfig(loss="minimax")
    with pytest.raises(ValueError, match="n_critic"):
        StepConfig(loss="hinge", n_critic=0)
    with pytest.raises(ValueError, match="DiffAugment"):
        StepConfig(loss="hinge", diffaugment=("zoom",))


class ConstantCritic(torch.nn.Module):
    """D(x) = b for every sample: with b = -inf the hinge loss is inf, its gradient finite."""

    def __init__(self, value: float):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x, labels=None):
        return self.b.expand(x.shape[0])


def test_non_finite_loss_with_finite_gradients_is_still_reported():
    state = make_state()
    state.discriminator = ConstantCritic(float("-inf"))
    state.opt_d = torch.optim.Adam(state.discriminator.parameters())
    with pytest.raises(NonFiniteError, match="non-finite d update") as info:
        run(state, StepConfig(loss="hinge"), steps=1)
    assert info.value.values["loss_d"] == float("inf")
    assert math.isfinite(info.value.values["grad_norm_d"])
