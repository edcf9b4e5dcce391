"""gan.models.progan: the ProGAN networks of Karras et al. 2018 (parameter counts by hand, shapes
at every phase, exact fade-in ends, equalized learning rate, minibatch stddev by hand, the
non-growing export, the stage through deepcopy and EMA, one training step)."""

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from gan.ema import GeneratorEMA
from gan.models import GeneratorSpec, build_discriminator, build_generator, final_state_dict
from gan.models.progan import (
    EqualizedConv2d,
    EqualizedLinear,
    ProGANDiscriminator,
    ProGANGenerator,
    final_generator,
    mbstd_group_size,
    minibatch_stddev,
    pixel_norm,
    progan_channels,
)
from gan.progressive import GrowthSchedule, apply_stage, blend_reals
from gan.regularizers import apply_spectral_norm
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, StepConfig, adam, train_step

# The small configuration counted by hand below: 1 channel, 64 px, z_dim 8, width 16, so the
# channel schedule is 16 at 4-32 px and 8 at 64 px.
SMALL = dict(channels=1, resolution=64, width=16)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv(i, o, k):
    return i * o * k * k + o


def generator(num_classes=0, seed=0, **kwargs) -> ProGANGenerator:
    torch.manual_seed(seed)
    return ProGANGenerator(**(SMALL | dict(z_dim=8, num_classes=num_classes) | kwargs))


def discriminator(num_classes=0, seed=1, **kwargs) -> ProGANDiscriminator:
    torch.manual_seed(seed)
    return ProGANDiscriminator(**(SMALL | dict(num_classes=num_classes) | kwargs))


def test_channel_schedule():
    assert [progan_channels(r, 512) for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024)] == [
        512,
        512,
        512,
        512,
        256,
        128,
        64,
        32,
        16,
    ]  # fmt: skip  (the paper's table 2: fmap_base 8192, fmap_max 512)
    assert [progan_channels(r, 64) for r in (4, 32, 64, 128, 256)] == [64, 64, 32, 16, 8]
    assert progan_channels(1024, 64) == 8  # never below 8


def test_parameter_counts_by_hand():
    g = generator()
    g_input = 8 * 16 * 16 + 16 + conv(16, 16, 3)  # dense without bias, a bias per channel, conv
    g_blocks = 3 * 2 * conv(16, 16, 3) + conv(16, 8, 3) + conv(8, 8, 3)  # 8, 16, 32; 64
    to_rgb = 4 * conv(16, 1, 1) + conv(8, 1, 1)  # 4, 8, 16, 32; 64
    assert count(g) == g_input + g_blocks + to_rgb == 20_125
    d = discriminator()
    from_rgb = 4 * conv(1, 16, 1) + conv(1, 8, 1)
    d_blocks = conv(8, 8, 3) + conv(8, 16, 3) + 3 * 2 * conv(16, 16, 3)  # 64; 32, 16, 8
    d_output = conv(17, 16, 3) + (16 * 16 * 16 + 16) + (16 + 1)  # mbstd map, dense, logit
    assert count(d) == from_rgb + d_blocks + d_output == 22_409
    # conditional: a z_dim-wide class embedding doubles G's dense input; D's projection
    # embedding is nf(4) wide
    assert count(generator(num_classes=10)) - count(g) == 10 * 8 + 8 * 16 * 16
    assert count(discriminator(num_classes=10)) - count(d) == 10 * 16
    # the non-growing generator lacks the four lower toRGB layers; start 8 lacks the 4x4 ones
    assert count(generator(growing=False)) == count(g) - 4 * conv(16, 1, 1)
    assert count(generator(start_resolution=8)) == count(g) - conv(16, 1, 1)
    assert count(discriminator(start_resolution=8)) == count(d) - conv(1, 16, 1)


def test_the_factories_build_progan_and_others_ignore_its_keywords():
    g = build_generator("progan", z_dim=8, start_resolution=8, **SMALL)
    d = build_discriminator("progan", start_resolution=8, spectral_norm=False, **SMALL)
    assert isinstance(g, ProGANGenerator) and g.start_resolution == 8 and g.growing
    assert isinstance(d, ProGANDiscriminator) and d.start_resolution == 8
    assert (g.current_resolution, g.alpha) == (64, 1.0)  # built at the final stage
    plain = build_generator("dcgan", channels=1, resolution=16, z_dim=8, width=8)
    ignored = build_generator(
        "dcgan", channels=1, resolution=16, z_dim=8, width=8, start_resolution=8, growing=False
    )
    assert count(plain) == count(ignored)
    spec = GeneratorSpec("progan", channels=1, resolution=64, z_dim=8, width=16)
    assert not spec.build().growing


@pytest.mark.parametrize("num_classes, start", [(0, 4), (10, 4), (0, 8)])
def test_shapes_at_every_phase(num_classes, start):
    g = generator(num_classes, start_resolution=start)
    d = discriminator(num_classes, start_resolution=start)
    keys = set(g.state_dict()) | {"D." + k for k in d.state_dict()}
    schedule = GrowthSchedule(start, 64, stabilise_images=10, fade_images=10)
    z = torch.randn(4, 8)
    labels = torch.arange(4) % 10 if num_classes else None
    seen = []
    for phase in schedule.phases():
        stage = schedule.at(phase.start + 5)  # mid-phase: alpha 0.5 in a fade
        apply_stage(stage, g, d)
        images_out = g(z, labels)
        assert images_out.shape == (4, 1, stage.resolution, stage.resolution)
        logits = d(images_out, labels)
        assert logits.shape == (4,) and torch.isfinite(logits).all()
        seen.append((stage.resolution, stage.alpha))
    fades = [(r, 0.5) for r in (8, 16, 32, 64) if r > start]
    stable = [(r, 1.0) for r in (4, 8, 16, 32, 64) if r >= start]
    assert sorted(seen) == sorted(fades + stable)
    # the state_dict's keys are those of construction, whatever the stage
    assert set(g.state_dict()) | {"D." + k for k in d.state_dict()} == keys


def _below(state, resolution):
    """The entries of a state_dict a network of final `resolution` has."""
    kept = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("blocks", "to_rgb", "from_rgb") and int(rest.split(".")[0]) > resolution:
            continue
        kept[key] = value
    return kept


def _smaller(network, resolution):
    """A network of the same kind with final `resolution` (8 at stage (4, 1) for 4, the
    smallest final resolution), holding `network`'s weights."""
    kind = type(network)
    final = max(resolution, 8)
    kwargs = dict(channels=1, resolution=final, width=16, num_classes=network.num_classes)
    if kind is ProGANGenerator:
        kwargs["z_dim"] = network.z_dim
    small = kind(**kwargs)
    small.load_state_dict(_below(network.state_dict(), final))
    small.set_stage(resolution, 1.0)
    return small


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("resolution", [8, 16, 64])
def test_generator_fade_ends_are_the_next_and_previous_networks(resolution, num_classes):
    g = generator(num_classes)
    z = torch.randn(5, 8)
    labels = torch.tensor([0, 1, 2, 0, 1]) if num_classes else None
    with torch.no_grad():
        nxt = _smaller(g, resolution)(z, labels)  # final resolution `resolution`, alpha 1
        prev = _smaller(g, resolution // 2)(z, labels)
        g.set_stage(resolution, 1.0)
        assert torch.equal(g(z, labels), nxt)
        g.set_stage(resolution, 0.0)
        up = F.interpolate(prev, scale_factor=2, mode="nearest")
        assert torch.equal(g(z, labels), up)
        g.set_stage(resolution, 0.25)
        assert torch.equal(g(z, labels), torch.lerp(up, nxt, 0.25))
        assert not torch.equal(g(z, labels), up) and not torch.equal(g(z, labels), nxt)


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("resolution", [8, 16, 64])
def test_discriminator_fade_ends_are_the_next_and_previous_networks(resolution, num_classes):
    d = discriminator(num_classes)
    x = torch.randn(8, 1, resolution, resolution)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]) if num_classes else None
    with torch.no_grad():
        nxt = _smaller(d, resolution)(x, labels)
        prev = _smaller(d, resolution // 2)(F.avg_pool2d(x, 2), labels)
        d.set_stage(resolution, 1.0)
        assert torch.equal(d(x, labels), nxt)
        d.set_stage(resolution, 0.0)
        assert torch.equal(d(x, labels), prev)
        d.set_stage(resolution, 0.5)
        mid = d(x, labels)
        assert not torch.equal(mid, prev) and not torch.equal(mid, nxt)
        # by hand: lerp(fromRGB_prev(avgpool(x)), block_new(fromRGB_new(x)), alpha), then the rest
        act = torch.nn.functional.leaky_relu
        h = torch.lerp(
            act(d.from_rgb[str(resolution // 2)](F.avg_pool2d(x, 2)), 0.2),
            d.blocks[str(resolution)](act(d.from_rgb[str(resolution)](x), 0.2)),
            0.5,
        )
        r = resolution // 2
        while r >= 8:  # the lower blocks, down to 4x4
            h, r = d.blocks[str(r)](h), r // 2
        features = d.output.features(h)
        logit = d.output.to_logit(features).squeeze(1)
        if num_classes:
            logit = logit + (d.embed(labels) * features).sum(dim=1)
        assert torch.allclose(mid, logit, atol=1e-6)


def test_equalized_layers_scale_n01_weights_at_run_time():
    torch.manual_seed(0)
    layer = EqualizedConv2d(64, 32, 3)
    assert layer.scale == pytest.approx(math.sqrt(2 / (64 * 9)))
    assert abs(layer.weight.mean().item()) < 0.02 and abs(layer.weight.std().item() - 1) < 0.02
    assert torch.count_nonzero(layer.bias) == 0
    x = torch.randn(2, 64, 5, 5)
    effective = layer.weight * math.sqrt(2 / (64 * 9))
    assert torch.allclose(layer(x), F.conv2d(x, effective, layer.bias, padding=1), atol=1e-6)
    # the stored weight is the N(0, 1) one: the scale is applied in forward, not saved
    assert torch.equal(layer.state_dict()["weight"], layer.weight.detach())
    to_rgb = EqualizedConv2d(64, 3, 1, gain=1.0)
    assert to_rgb.scale == pytest.approx(1 / 8)
    dense = EqualizedLinear(256, 16)
    assert dense.scale == pytest.approx(math.sqrt(2 / 256))
    v = torch.randn(3, 256)
    expected = v @ (dense.weight * math.sqrt(2 / 256)).T + dense.bias
    assert torch.allclose(dense(v), expected, atol=1e-6)
    # the gradient reaching the stored weight is the effective weight's, times the scale
    dense(v).sum().backward()
    w = (dense.weight.detach() * dense.scale).requires_grad_(True)
    F.linear(v, w, dense.bias.detach()).sum().backward()
    assert torch.allclose(dense.weight.grad, w.grad * dense.scale, atol=1e-6)


def test_a_spectrally_normalised_layer_drops_the_he_constant():
    # SN already gives the weight spectral norm 1; the He constant on top would shrink every
    # layer (a 32 px D's logits had std 3e-15 with both)
    torch.manual_seed(0)
    layer = apply_spectral_norm(EqualizedConv2d(8, 4, 3)).eval()
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-6)
    d = build_discriminator("progan", channels=3, resolution=32, width=32)  # SN by default
    assert d(torch.rand(8, 3, 32, 32) * 2 - 1).std() > 1e-5


def test_every_layer_is_equalized_and_d_has_no_normalisation():
    g, d = generator(num_classes=3), discriminator(num_classes=3)
    for net in (g, d):
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                assert isinstance(m, (EqualizedConv2d, EqualizedLinear)), m
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not any(isinstance(m, norms + (torch.nn.InstanceNorm2d,)) for m in d.modules())
    assert g.blocks["4"].dense.scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(16))
    assert d.output.to_logit.scale == pytest.approx(1 / math.sqrt(16))  # gain 1
    assert g.to_rgb["64"].scale == pytest.approx(1 / math.sqrt(8))  # gain 1


def test_pixel_norm_gives_unit_mean_square_per_pixel():
    x = torch.randn(2, 7, 3, 3) * 5
    y = pixel_norm(x)
    assert torch.allclose(y.square().mean(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    assert torch.allclose(y * x.square().mean(dim=1, keepdim=True).sqrt(), x, atol=1e-5)


def _stddev_by_hand(x, groups):
    """The appended value of each sample, from Python floats: per group, every feature's
    population standard deviation (+1e-8 inside the root), averaged over the features."""
    n = x.shape[0]
    features = x.reshape(n, -1).tolist()
    out = [0.0] * n
    for members in groups:
        per_feature = [
            math.sqrt(statistics.pvariance([features[i][f] for i in members]) + 1e-8)
            for f in range(len(features[0]))
        ]
        for i in members:
            out[i] = statistics.fmean(per_feature)
    return out


@pytest.mark.parametrize(
    "batch, groups",
    [
        (8, [[0, 2, 4, 6], [1, 3, 5, 7]]),  # group 4: sample i in group i mod 2
        (6, [[0, 2, 4], [1, 3, 5]]),  # 4 does not divide 6: groups of 3
        (2, [[0, 1]]),
        (5, [[0], [1], [2], [3], [4]]),  # a prime batch: groups of 1, deviation sqrt(1e-8)
    ],
)
def test_minibatch_stddev_by_hand(batch, groups):
    assert mbstd_group_size(batch) == len(groups[0])
    torch.manual_seed(0)
    x = torch.randn(batch, 2, 3, 3)
    y = minibatch_stddev(x)
    assert y.shape == (batch, 3, 3, 3)
    assert torch.equal(y[:, :2], x)
    appended = y[:, 2]
    assert torch.equal(appended, appended[:, :1, :1].expand(batch, 3, 3))  # constant per map
    expected = torch.tensor(_stddev_by_hand(x, groups))
    assert torch.allclose(appended[:, 0, 0], expected, atol=1e-6)


def test_minibatch_stddev_of_a_tiny_batch_in_round_numbers():
    # two samples, 0 and 2 everywhere: every feature's deviation is 1 (sqrt(1 + 1e-8))
    x = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    assert torch.allclose(minibatch_stddev(x)[:, 1], torch.ones(2, 2, 2))


@pytest.mark.parametrize("num_classes", [0, 4])
def test_the_non_growing_export_equals_the_growing_generator_at_the_final_stage(num_classes):
    g = generator(num_classes)
    state = final_state_dict(g)
    assert not any(k.startswith(("to_rgb.4.", "to_rgb.8.", "to_rgb.32.")) for k in state)
    spec = GeneratorSpec(
        "progan", channels=1, resolution=64, z_dim=8, width=16, num_classes=num_classes
    )
    exported = spec.build()
    exported.load_state_dict(state)  # strict: the keys match exactly
    z = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3]) if num_classes else None
    with torch.no_grad():
        g.set_stage(64, 1.0)
        assert torch.equal(exported(z, labels), g(z, labels))
        assert torch.equal(final_generator(g)(z, labels), g(z, labels))
    with pytest.raises(ValueError, match="from 64 to 64"):
        exported.set_stage(32, 1.0)
    # a spectrally normalised generator exports as GeneratorSpec(spectral_norm=True) builds it
    kwargs = dict(channels=1, resolution=16, z_dim=8, width=8, num_classes=num_classes)
    sn = build_generator("progan", spectral_norm=True, **kwargs).eval()
    sn_spec = GeneratorSpec("progan", spectral_norm=True, **kwargs).build().eval()
    sn_spec.load_state_dict(final_state_dict(sn))
    with torch.no_grad():
        assert torch.equal(final_generator(sn)(z, labels), sn(z, labels))
        assert torch.equal(sn_spec(z, labels), sn(z, labels))
    with pytest.raises(TypeError, match="ProGANGenerator"):
        final_state_dict(build_generator("dcgan", channels=1, resolution=8, z_dim=8, width=8))


def test_the_stage_survives_deepcopy_and_the_ema_but_not_the_state_dict():
    g = generator()
    g.set_stage(16, 0.3)
    clone = copy.deepcopy(g)
    assert (clone.current_resolution, clone.alpha) == (16, 0.3)
    ema = GeneratorEMA(g, half_life_images=1, images_per_step=1)
    assert (ema.model.current_resolution, ema.model.alpha) == (16, 0.3)
    z = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(clone(z), g(z)) and clone(z).shape == (3, 1, 16, 16)
    fresh = generator(seed=5)
    fresh.load_state_dict(g.state_dict())
    assert (fresh.current_resolution, fresh.alpha) == (64, 1.0)  # the stage is not saved
    apply_stage(GrowthSchedule(4, 64, 10, 10).at(0), g, ema.model)
    assert g.current_resolution == ema.model.current_resolution == 4


def test_stage_and_input_checks():
    g, d = generator(start_resolution=8), discriminator()
    for bad in (4, 12, 128, 16.0):
        with pytest.raises(ValueError, match="power of two from 8 to 64"):
            g.set_stage(bad, 1.0)
    for alpha in (-0.1, 1.5, True, torch.tensor(0.5)):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            g.set_stage(16, alpha)
    with pytest.raises(ValueError, match="no lower resolution to fade from"):
        g.set_stage(8, 0.5)
    d.set_stage(16, 0.5)
    with pytest.raises(ValueError, match="stage 16x16 but got images of shape"):
        d(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="power-of-two resolution from 8 to 1024"):
        ProGANGenerator(1, 48)
    with pytest.raises(ValueError, match="start_resolution must be a power of two from 4"):
        ProGANDiscriminator(1, 32, start_resolution=64)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_one_training_step_at_a_low_stage_trains_only_what_runs(num_classes):
    torch.manual_seed(0)
    kwargs = dict(channels=1, resolution=16, width=16, num_classes=num_classes)
    g = build_generator("progan", z_dim=8, **kwargs)
    d = build_discriminator("progan", spectral_norm=False, **kwargs)
    ema = GeneratorEMA(g, half_life_images=1, images_per_step=6, rampup=None)
    stage = GrowthSchedule(4, 16, stabilise_images=60, fade_images=60).at(90)  # fading into 8
    assert (stage.resolution, stage.alpha) == (8, 0.5)
    apply_stage(stage, g, d, ema.model)
    state = GANTrainState(
        g, d, adam(g.parameters(), 1e-3, (0.0, 0.99)), adam(d.parameters(), 1e-3, (0.0, 0.99)), ema
    )
    before_g = copy.deepcopy(g.state_dict())
    before_d = copy.deepcopy(d.state_dict())
    rng = torch.Generator().manual_seed(1)

    def batches():
        while True:
            x = torch.rand(6, 1, 16, 16, generator=rng) * 2 - 1  # full-resolution reals
            y = torch.randint(0, num_classes, (6,), generator=rng) if num_classes else None
            yield blend_reals(x, stage.resolution, stage.alpha), y

    cfg = StepConfig(loss="wasserstein", gp_weight=10.0)  # the paper's WGAN-GP
    metrics = train_step(state, batches(), cfg, LatentSampler(8, num_classes),
                         step_generator(0, 0, 0), step=0)  # fmt: skip
    state.divergence.raise_if_diverged()
    assert all(torch.isfinite(v) for v in metrics.values())

    def changed(module, before, prefix):
        return not torch.equal(module.state_dict()[prefix], before[prefix])

    for key in ("blocks.4.dense.weight", "blocks.8.conv1.weight", "to_rgb.4.weight",
                "to_rgb.8.weight"):  # fmt: skip
        assert changed(g, before_g, key), key
    for key in ("from_rgb.4.weight", "from_rgb.8.weight", "blocks.8.conv0.weight",
                "output.dense.weight"):  # fmt: skip
        assert changed(d, before_d, key), key
    # the 16 px layers do not run at stage (8, 0.5): untouched
    assert not changed(g, before_g, "blocks.16.conv0.weight")
    assert not changed(g, before_g, "to_rgb.16.weight")
    assert not changed(d, before_d, "from_rgb.16.weight")
    assert not changed(d, before_d, "blocks.16.conv1.weight")
    assert ema.model(torch.randn(2, 8), torch.tensor([0, 1]) if num_classes else None).shape == (
        2, 1, 8, 8,
    )  # fmt: skip
