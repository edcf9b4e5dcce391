import math

import pytest
import torch
from torch import nn

from gan.ema import GeneratorEMA, refresh_statistics, unwrap
from gan.models import build_generator
from gan.sampling import LatentSampler, step_generator


def constant_net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def fill(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def test_beta_follows_a_half_life_in_images():
    ema = GeneratorEMA(constant_net(0.0), half_life_images=1000, images_per_step=100, rampup=None)
    # after a half-life's worth of updates (10 x 100 images) the old average weighs one half
    assert math.prod(ema.beta(step) for step in range(10)) == pytest.approx(0.5)
    same = GeneratorEMA(constant_net(0.0), half_life_images=1000, images_per_step=50, rampup=None)
    assert math.prod(same.beta(step) for step in range(20)) == pytest.approx(0.5)
    # a batch that changes during training (progan): 4 updates of 200 images, then 50s
    shown = [0, 200, 400, 600, 800, 850, 900, 950, 1000]
    varying = GeneratorEMA(
        constant_net(0.0), 1000, 200, rampup=None, images_before=shown.__getitem__
    )
    assert math.prod(varying.beta(step) for step in range(8)) == pytest.approx(0.5)
    assert varying.beta(0) == pytest.approx(0.5 ** 0.2) and varying.beta(5) == pytest.approx(
        0.5 ** 0.05)  # fmt: skip


def test_rampup_shortens_the_half_life_early_in_a_run():
    ema = GeneratorEMA(constant_net(0.0), half_life_images=10_000, images_per_step=128)
    # step 0: half-life 0.01 x 128 images, a copy in all but name
    assert ema.beta(0) < 1e-30
    # 1,000 steps of 128: half-life min(10k, 0.01 x 128k = 1.28k images) = 10 steps
    assert ema.beta(999) == pytest.approx(0.5 ** (1 / 10))
    stylegan = GeneratorEMA(constant_net(0.0), 10_000, 128, rampup=0.05)  # 6.4k: 50 steps
    assert stylegan.beta(999) == pytest.approx(0.5 ** (1 / 50))
    # a long run reaches the configured half-life: 10k images = 78.125 steps of 128
    assert ema.beta(1_000_000) == pytest.approx(0.5 ** (128 / 10_000))


def test_update_blends_with_beta_and_zero_half_life_copies():
    net = constant_net(0.0)
    ema = GeneratorEMA(net, half_life_images=1, images_per_step=1, rampup=None)  # beta 0.5
    fill(net, 2.0)
    ema.update(net, step=5)
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.0))
    copy = GeneratorEMA(net, half_life_images=0, images_per_step=1)
    fill(net, 3.0)
    copy.update(net, step=0)
    assert all(torch.all(p == 3.0) for p in copy.model.parameters())


def test_batch_norm_statistics_are_not_copied_from_the_live_generator():
    net = constant_net(0.0)
    ema = GeneratorEMA(net, half_life_images=1, images_per_step=1)
    before = ema.model[1].running_mean.clone()
    net.train()(torch.randn(8, 2) * 3 + 5)  # moves the live BatchNorm running mean
    ema.update(net, step=10)
    torch.testing.assert_close(ema.model[1].running_mean, before)
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_unwraps_a_ddp_like_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    net = constant_net(1.0)
    ema = GeneratorEMA(Wrapper(net), half_life_images=1, images_per_step=1, rampup=None)
    assert isinstance(ema.model, nn.Sequential)
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    ema.update(Wrapper(net), step=5)
    torch.testing.assert_close(ema.model[0].weight, torch.full((2, 2), 2.0))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="half-life"):
        GeneratorEMA(constant_net(0.0), half_life_images=-1, images_per_step=1)
    with pytest.raises(ValueError, match="ramp-up"):
        GeneratorEMA(constant_net(0.0), half_life_images=1, images_per_step=1, rampup=0)


def test_unwrap_sees_through_ddp_and_compile_wrappers():
    net = constant_net(1.0)
    compiled = torch.compile(net)
    assert unwrap(compiled) is net
    assert unwrap(net) is net


def drifting_run(steps=30, num_classes=0):
    """A DCGAN generator whose weights move every step (a stand-in for optimisation: random
    walks plus a drift of the first layer's scale), so its running BatchNorm statistics keep
    lagging and the average's weights differ from the live ones."""
    torch.manual_seed(0)
    g = build_generator("dcgan", channels=1, resolution=8, z_dim=8, width=8,
                        num_classes=num_classes)  # fmt: skip
    ema = GeneratorEMA(g, half_life_images=400, images_per_step=8, rampup=None)
    sampler = LatentSampler(8, num_classes)
    g.train()
    for step in range(steps):
        with torch.no_grad():
            for p in g.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            g.convs[0].weight.mul_(1.1)
        z, labels = sampler(8, step_generator(0, 0, step))
        g(z, labels)  # a train-mode forward: what moves the live statistics
        ema.update(g, step)
    return g, ema, sampler


def batch_moments(generator, sampler, n=4096):
    """Per-channel mean and variance of the first block's pre-normalisation activations, the
    statistics the first BatchNorm should hold for these weights."""
    z, labels = sampler(n, torch.Generator().manual_seed(123))
    with torch.no_grad():
        x = generator.convs[0](z.view(n, -1, 1, 1))
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))


def test_averaged_generator_uses_statistics_of_its_own_weights():
    g, ema, sampler = drifting_run()
    live_norm, ema_norm = g.norms[0], ema.model.norms[0]
    assert not torch.allclose(live_norm.running_var, ema_norm.running_var, rtol=0.2)
    averaged = ema.averaged(sampler, seed=0)
    mean, var = batch_moments(averaged, sampler)
    # within sampling error of the moments on 4,096 other draws (a tenth of a std)
    assert ((averaged.norms[0].running_mean - mean).abs() < 0.1 * var.sqrt()).all()
    torch.testing.assert_close(averaged.norms[0].running_var, var, rtol=0.1, atol=1e-3)
    # the live generator's statistics belong to other weights: far from these
    assert (live_norm.running_var / var).max() > 1.5 or (var / live_norm.running_var).max() > 1.5
    assert not averaged.training


def test_refreshed_statistics_are_deterministic_and_cached_until_the_next_update():
    g, ema, sampler = drifting_run(num_classes=3)
    first = ema.averaged(sampler, seed=7).norms[0].norm.running_mean.clone()
    ema.model.norms[0].norm.running_mean.fill_(42.0)  # no update since: not recomputed
    assert ema.averaged(sampler, seed=7).norms[0].norm.running_mean.eq(42.0).all()
    ema.update(g, step=99)  # new weights: recomputed, whatever the buffers held
    other = GeneratorEMA(g, 400, 8, rampup=None)
    other.model.load_state_dict(ema.model.state_dict())
    a = ema.averaged(sampler, seed=7).state_dict()
    b = other.averaged(sampler, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["norms.0.norm.running_mean"], first)


def test_refresh_leaves_a_network_without_batch_norm_alone():
    g = build_generator("mlp", channels=1, resolution=8, z_dim=4, width=8)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    refresh_statistics(g, LatentSampler(4), seed=0)
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert not g.training
