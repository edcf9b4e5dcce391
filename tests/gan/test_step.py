"""gan.step: what one step trains, and its contract since issue 14: metrics stay on the
device (0-d tensors, no host synchronisation), a non-finite update is skipped instead of raising
inside the step, and `state.divergence.raise_if_diverged()` reports the first bad step."""

import copy
import math
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gan.ema import GeneratorEMA
from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, step_generator
from gan.step import (
    GANTrainState,
    NonFiniteError,
    StepConfig,
    adam,
    skips_on_device,
    to_floats,
    train_step,
)

EXPECTED_KEYS = {
    "loss_d", "loss_g", "gp", "r1", "grad_norm_d", "grad_norm_g",
    "d_real", "d_fake", "d_real_logit", "d_fake_logit",
}  # fmt: skip


def plain_adam(params, lr, betas):
    """An optimiser that cannot skip on the device: the step's host fallback."""
    return torch.optim.Adam(params, lr, betas=betas)


def fused_flag_lost(params, lr, betas):
    """A fused Adam that loaded a non-fused Adam's state dict (an older checkpoint): its groups
    say fused None, so it must take the host fallback too."""
    params = list(params)
    optimizer = adam(params, lr, betas)
    optimizer.load_state_dict(plain_adam(params, lr, betas).state_dict())
    return optimizer


OPTIMIZERS = {"fused": adam, "plain": plain_adam, "fused-flag-lost": fused_flag_lost}


def make_state(num_classes=0, family="dcgan", seed=0, norm="none", optimizer=adam):
    torch.manual_seed(seed)
    g = build_generator(family, channels=1, resolution=8, z_dim=8, width=8, num_classes=num_classes)
    d = build_discriminator(
        family, channels=1, resolution=8, width=8, num_classes=num_classes, norm=norm
    )
    return GANTrainState(
        generator=g,
        discriminator=d,
        opt_g=optimizer(g.parameters(), 1e-3, (0.0, 0.9)),
        opt_d=optimizer(d.parameters(), 1e-3, (0.0, 0.9)),
        ema=GeneratorEMA(g, half_life_images=1, images_per_step=1, rampup=None),  # beta 0.5
    )


def batches(num_classes=0, seed=1, poisoned=()):
    """Random batches; the batches whose index is in `poisoned` are NaN."""
    rng = torch.Generator().manual_seed(seed)
    index = 0
    while True:
        x = torch.rand(6, 1, 8, 8, generator=rng) * 2 - 1
        y = torch.randint(0, num_classes, (6,), generator=rng) if num_classes else None
        yield (torch.full_like(x, float("nan")) if index in poisoned else x), y
        index += 1


def run(state, cfg, steps=3, num_classes=0, seed=0, data=None, start=0):
    data = batches(num_classes) if data is None else data
    sampler = LatentSampler(8, num_classes)
    return [
        train_step(state, data, cfg, sampler, step_generator(seed, 0, step), step)
        for step in range(start, start + steps)
    ]


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


def snapshot(state):
    """Every tensor a step may update, except buffers that forwards update."""
    return copy.deepcopy(
        {
            "generator": weights(state.generator),
            "discriminator": weights(state.discriminator),
            "ema": weights(state.ema.model),
            "opt_g": state.opt_g.state_dict()["state"],
            "opt_d": state.opt_d.state_dict()["state"],
        }
    )


def assert_bitwise_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bitwise_equal(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("loss", ["bce", "lsgan", "hinge", "wasserstein"])
def test_step_returns_finite_device_scalars_and_updates_both_networks(loss):
    state = make_state()
    g0, d0 = weights(state.generator), weights(state.discriminator)
    (metrics,) = run(state, StepConfig(loss=loss), steps=1)
    assert set(metrics) == EXPECTED_KEYS
    assert all(torch.is_tensor(v) and v.shape == () for v in metrics.values())
    floats = to_floats(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in floats.values())
    assert 0 < floats["d_real"] < 1 and 0 < floats["d_fake"] < 1
    state.divergence.raise_if_diverged()  # a finite run: nothing to raise
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
    metrics = to_floats(metrics)
    grads = [p.grad for p in state.discriminator.parameters() if p.grad is not None]
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(metrics["grad_norm_d"])
    assert all(p.requires_grad for p in state.discriminator.parameters())


def test_penalties_are_reported_and_r1_is_lazy():
    state = make_state()
    cfg = StepConfig(loss="bce", r1_gamma=1.0, r1_every=2, gp_weight=1.0)
    steps = [to_floats(m) for m in run(state, cfg, steps=4)]
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


def test_the_drift_term_pulls_the_critics_real_outputs_toward_zero():
    """ProGAN's epsilon_drift: D's loss gains weight * E[D(real)^2]; with a large weight one
    update leaves D's outputs on the batch's reals closer to 0 than the same update without."""
    real, _ = next(batches())
    squares = []
    for drift in (0.0, 50.0):
        state = make_state()  # the same weights each time
        run(state, StepConfig(loss="wasserstein", drift_weight=drift), steps=1)
        with torch.no_grad():
            squares.append(state.discriminator(real).square().mean().item())
    assert squares[1] < squares[0]
    with pytest.raises(ValueError, match="drift_weight must be >= 0"):
        StepConfig(loss="wasserstein", drift_weight=-1)


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
    assert set(metrics) == EXPECTED_KEYS and math.isfinite(to_floats(metrics)["r1"])


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


def test_step_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown GAN loss"):
        StepConfig(loss="minimax")
    with pytest.raises(ValueError, match="n_critic"):
        StepConfig(loss="hinge", n_critic=0)
    with pytest.raises(ValueError, match="DiffAugment"):
        StepConfig(loss="hinge", diffaugment=("zoom",))


def test_with_one_critic_update_the_generator_update_reuses_the_fake_batch():
    """Since issue 14: one generator forward per step (it was two), with gradients, and the
    generator update scores the very batch D was trained on (D saw it detached)."""
    state = make_state()
    outputs, seen = [], []
    state.generator.register_forward_hook(lambda module, args, out: outputs.append(out))
    state.discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    run(state, StepConfig(loss="hinge"), steps=3)
    assert len(outputs) == 3 and all(out.requires_grad for out in outputs)
    for step in range(3):  # D sees real, fake (D update), fake (G update) in every step
        _, d_fake, g_fake = seen[3 * step : 3 * step + 3]
        assert torch.equal(d_fake, outputs[step]) and torch.equal(g_fake, outputs[step])
        assert not d_fake.requires_grad and g_fake.requires_grad


def test_with_several_critic_updates_the_generator_update_draws_fresh_noise():
    """n_critic > 1 is unchanged: n_critic generator forwards without gradients for D's
    updates, then one with gradients on fresh noise for G's."""
    state = make_state()
    calls = []
    state.generator.register_forward_pre_hook(
        lambda module, args: calls.append((args[0], torch.is_grad_enabled()))
    )
    run(state, StepConfig(loss="wasserstein", n_critic=3), steps=2)
    assert len(calls) == 8
    for step in range(2):
        group = calls[4 * step : 4 * step + 4]
        assert [grad for _, grad in group] == [False, False, False, True]
        assert all(not torch.equal(group[3][0], z) for z, _ in group[:3])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_non_finite_update_is_skipped_and_so_is_every_later_one(optimizer):
    """Since issue 14 the step no longer raises: a NaN batch at step 2 leaves parameters,
    optimiser state and EMA bitwise as they were after step 1 (in the fused kernel for a fused
    Adam, through the host fallback otherwise), and steps 3 and 4, on finite data, are skipped
    too (the flag is sticky); the report names step 2."""
    state = make_state(optimizer=OPTIMIZERS[optimizer])
    assert skips_on_device(state.opt_d) == skips_on_device(state.opt_g) == (optimizer == "fused")
    cfg, data = StepConfig(loss="bce"), batches(poisoned={2})
    run(state, cfg, steps=2, data=data)
    state.divergence.raise_if_diverged()  # finite so far
    before = snapshot(state)
    run(state, cfg, steps=3, data=data, start=2)
    assert_bitwise_equal(snapshot(state), before)
    with pytest.raises(NonFiniteError, match="diverged at step 2: non-finite d update") as info:
        state.divergence.raise_if_diverged()
    assert info.value.step == 2 and info.value.phase == "d"
    assert set(info.value.values) == EXPECTED_KEYS - {"loss_g", "grad_norm_g"}
    assert math.isnan(info.value.values["loss_d"]) and info.value.values["gp"] == 0


def test_a_first_update_that_is_not_finite_leaves_fresh_optimiser_state():
    """NaN weights in D at step 0: neither D's update nor G's (after it) is applied; the fused
    kernel creates Adam's state but leaves it at step 0 with zero moments."""
    state = make_state()
    with torch.no_grad():
        next(state.discriminator.parameters()).view(-1)[0] = float("nan")
    d_before, g_before = weights(state.discriminator), weights(state.generator)
    run(state, StepConfig(loss="bce"), steps=1)
    with pytest.raises(NonFiniteError, match="diverged at step 0: non-finite d update") as info:
        state.divergence.raise_if_diverged()
    assert info.value.step == 0 and info.value.phase == "d"
    assert_bitwise_equal(weights(state.discriminator), d_before)
    assert_bitwise_equal(weights(state.generator), g_before)
    for optimizer in (state.opt_d, state.opt_g):
        for s in optimizer.state.values():
            assert s["step"].item() == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()


def test_raise_if_diverged_names_the_first_bad_step_and_phase():
    """Non-finite generator gradients from step 1 on (and everything after): step 1's G
    update is the first bad one, and every later report says so again."""
    state = make_state()
    armed = []
    for p in state.generator.parameters():
        p.register_hook(lambda grad: grad * float("inf") if armed else grad)
    cfg = StepConfig(loss="hinge")
    run(state, cfg, steps=1)
    state.divergence.raise_if_diverged()
    armed.append(True)
    run(state, cfg, steps=3, start=1)
    for _ in range(2):
        with pytest.raises(NonFiniteError, match="diverged at step 1: non-finite g update") as info:
            state.divergence.raise_if_diverged()
        assert info.value.step == 1 and info.value.phase == "g"
        assert set(info.value.values) == {"loss_g", "grad_norm_g"}
        assert math.isfinite(info.value.values["loss_g"])
        assert not math.isfinite(info.value.values["grad_norm_g"])


class ConstantCritic(torch.nn.Module):
    """D(x) = b for every sample: with b = -inf the hinge loss is inf, its gradient finite
    (the zero term keeps x in the graph, so the generator update can run after it)."""

    def __init__(self, value: float):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x, labels=None):
        return self.b + 0 * x.flatten(1).mean(dim=1)


def test_non_finite_loss_with_finite_gradients_is_still_reported():
    state = make_state()
    state.discriminator = ConstantCritic(float("-inf"))
    state.opt_d = adam(state.discriminator.parameters(), 1e-3, (0.0, 0.9))
    run(state, StepConfig(loss="hinge"), steps=1)
    assert state.discriminator.b.item() == float("-inf")  # not stepped
    with pytest.raises(NonFiniteError, match="non-finite d update") as info:
        state.divergence.raise_if_diverged()
    assert info.value.values["loss_d"] == float("inf")
    assert math.isfinite(info.value.values["grad_norm_d"])


# Calls that read a tensor's value on the host: on a GPU each one waits for the device.
HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
}  # fmt: skip


class HostReads(TorchFunctionMode):
    """Records (name, caller's file) of every host read of a tensor while it is active: a
    TorchFunctionMode sees every Python-level tensor method call, torch's own code included."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append((func.__name__, sys._getframe(1).f_code.co_filename))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "cfg, num_classes",
    [
        (StepConfig(loss="bce", r1_gamma=1.0, diffaugment=("color", "translation", "cutout")), 0),
        (StepConfig(loss="wasserstein", n_critic=2, gp_weight=10.0), 0),
        (StepConfig(loss="hinge"), 3),
    ],
)
def test_a_step_reads_nothing_back_from_the_device(cfg, num_classes):
    """No host read anywhere in a step with the fused Adam (a GPU would synchronise at each):
    not in the step, the losses, DiffAugment, the penalties, the optimiser or the EMA. A CPU
    cannot show synchronisations, so the test counts the calls that would cause them."""
    state = make_state(num_classes=num_classes, norm="batch")
    run(state, cfg, steps=1, num_classes=num_classes)  # the optimisers' state exists from here
    with HostReads() as reads:
        metrics = run(state, cfg, steps=2, num_classes=num_classes, start=1)
    assert reads.calls == []
    assert all(v.shape == () for m in metrics for v in m.values())


def test_the_host_fallback_reads_one_flag_per_update():
    """An optimiser that cannot skip on the device costs one host read per update."""
    state = make_state(optimizer=plain_adam)
    with HostReads() as reads:
        run(state, StepConfig(loss="wasserstein", n_critic=2), steps=2)
    ours = [name for name, file in reads.calls if file.endswith("gan/step.py")]
    assert ours == ["item"] * 6  # (2 D updates + 1 G update) x 2 steps


def test_reports_read_the_metrics_and_the_divergence_record_in_one_transfer_each():
    state = make_state()
    (metrics,) = run(state, StepConfig(loss="hinge"), steps=1)
    with HostReads() as reads:
        floats = to_floats(metrics | {"step": 1})
        state.divergence.raise_if_diverged()
    assert [name for name, _ in reads.calls] == ["tolist", "tolist"]
    assert floats == {k: float(v) for k, v in metrics.items()} | {"step": 1.0}
    assert list(floats) == [*metrics, "step"]


def test_adam_is_fused_where_the_device_has_the_kernel():
    cpu = adam([torch.nn.Parameter(torch.zeros(3))], 2e-4, (0.5, 0.999))
    group = cpu.param_groups[0]
    assert group["fused"] and skips_on_device(cpu)
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)
    meta = adam([torch.nn.Parameter(torch.zeros(3, device="meta"))], 2e-4, (0.5, 0.999))
    assert not meta.param_groups[0]["fused"] and not skips_on_device(meta)
    assert not skips_on_device(torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], 0.1))


@pytest.mark.parametrize("half_life", [1, 3])  # lerp weights 0.5 and 0.21: both lerp formulas
def test_ema_update_with_a_device_skip_flag(half_life):
    """A false flag updates the average bitwise as the plain update does; a true one leaves it
    (and the copied buffers) as it is."""
    torch.manual_seed(0)
    g = build_generator("dcgan", channels=1, resolution=8, z_dim=8, width=8)
    plain, flagged, skipped = (GeneratorEMA(g, half_life, 1, rampup=None) for _ in range(3))
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p))
    before = weights(skipped.model)
    plain.update(g, 0)
    flagged.update(g, 0, skip=torch.tensor(False))
    skipped.update(g, 0, skip=torch.tensor(True))
    assert_bitwise_equal(weights(flagged.model), weights(plain.model))
    assert_bitwise_equal(weights(skipped.model), before)
    assert not torch.equal(weights(plain.model)[0], before[0])
