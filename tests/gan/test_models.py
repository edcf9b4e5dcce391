import pytest
import torch

from gan.models import (
    FAMILIES,
    ConditionalBatchNorm2d,
    DCGANGenerator,
    build_discriminator,
    build_generator,
)
from gan.models.mlp import MLPDiscriminator, MLPGenerator

LINEAR_OUTPUT = {"progan"}  # the paper's linear output: consumers clamp to [-1, 1]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_shapes_range_and_dtype(family, resolution, channels, num_classes):
    torch.manual_seed(0)
    g = build_generator(
        family, channels=channels, resolution=resolution, z_dim=16, width=8, num_classes=num_classes
    )
    d = build_discriminator(
        family, channels=channels, resolution=resolution, width=8, num_classes=num_classes
    )
    labels = torch.randint(0, 10, (3,)) if num_classes else None
    images = g(torch.randn(3, 16), labels)
    assert images.shape == (3, channels, resolution, resolution)
    assert images.dtype == torch.float32
    if family not in LINEAR_OUTPUT:
        assert images.abs().max() <= 1.0
    logits = d(images, labels)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_dcgan_matches_the_pytorch_tutorial_parameter_counts():
    # PyTorch's DCGAN tutorial (nz=100, ngf=ndf=64, nc=3, 64x64) prints these two numbers.
    g = build_generator("dcgan", channels=3, resolution=64, z_dim=100, width=64)
    d = build_discriminator(
        "dcgan", channels=3, resolution=64, width=64, norm="batch", spectral_norm=False
    )
    assert count(g) == 3_576_704
    assert count(d) == 2_765_568


def test_mlp_parameter_count_by_formula():
    g = MLPGenerator((1, 8, 8), z_dim=10, width=32, depth=2)
    assert count(g) == (10 * 32 + 32) + (32 * 32 + 32) + (32 * 64 + 64)
    d = MLPDiscriminator((1, 8, 8), width=32, depth=2, num_classes=10)
    assert count(d) == (74 * 32 + 32) + (32 * 32 + 32) + (32 + 1)


@pytest.mark.parametrize("family", ["dcgan", "resnet"])
def test_conditional_adds_exactly_the_label_parameters(family):
    kwargs = dict(channels=1, resolution=16, width=8)
    g0, g10 = (build_generator(family, z_dim=16, num_classes=k, **kwargs) for k in (0, 10))
    d0, d10 = (build_discriminator(family, num_classes=k, **kwargs) for k in (0, 10))
    cbn = [m for m in g10.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert cbn, "a conditional generator uses conditional BatchNorm"
    # each conditional BN trades 2C affine parameters for 2 x 10 x C embedded ones
    extra_g = sum(2 * 10 * m.norm.num_features - 2 * m.norm.num_features for m in cbn)
    assert count(g10) - count(g0) == extra_g
    assert count(d10) - count(d0) == 10 * d10.embed.embedding_dim  # the projection embedding


@pytest.mark.parametrize("family", FAMILIES)
def test_conditional_models_use_the_labels(family):
    torch.manual_seed(0)
    kwargs = dict(channels=1, resolution=16, num_classes=10)
    g = build_generator(family, z_dim=16, width=8, **kwargs).eval()
    d = build_discriminator(family, width=8, **kwargs)
    with torch.no_grad():
        if family != "mlp":  # make the label embeddings differ from their neutral init
            for m in g.modules():
                if isinstance(m, ConditionalBatchNorm2d):
                    m.scale.weight.normal_(1, 0.5)
        z = torch.randn(1, 16).repeat(2, 1)
        labels = torch.tensor([1, 7])
        images = g(z, labels)
        assert not torch.allclose(images[0], images[1])
        same = images[:1].repeat(2, 1, 1, 1)
        logits = d(same, labels)
        assert not torch.allclose(logits[0], logits[1])


def test_label_mismatch_is_a_clear_error():
    g = build_generator("dcgan", channels=1, resolution=16, z_dim=8, width=8, num_classes=10)
    with pytest.raises(ValueError, match="conditional on 10 classes"):
        g(torch.randn(2, 8))
    u = build_generator("dcgan", channels=1, resolution=16, z_dim=8, width=8)
    with pytest.raises(ValueError, match="unconditional"):
        u(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="LongTensor"):
        g(torch.randn(2, 8), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("resolution", [4, 12, 48])
def test_conv_families_reject_bad_resolutions(resolution):
    with pytest.raises(ValueError, match="power-of-two resolution"):
        DCGANGenerator(1, resolution)


@pytest.mark.parametrize("family", ["dcgan", "resnet"])
def test_spectral_norm_wraps_every_weight_layer(family):
    d = build_discriminator(family, channels=3, resolution=16, width=8, num_classes=5)
    weighted = [m for m in d.modules() if hasattr(m, "weight") and m.weight is not None]
    layers = [
        m for m in weighted if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))
    ]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    plain = build_discriminator(family, channels=3, resolution=16, width=8, spectral_norm=False)
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())


@pytest.mark.parametrize("norm", ["none", "batch", "instance", "layer"])
def test_dcgan_discriminator_norms(norm):
    d = build_discriminator("dcgan", channels=1, resolution=16, width=8, norm=norm)
    norm_kinds = {"BatchNorm2d", "InstanceNorm2d", "GroupNorm"}
    found = {type(m).__name__ for m in d.modules()} & norm_kinds
    expected = {"none": set(), "batch": {"BatchNorm2d"}, "instance": {"InstanceNorm2d"}}
    assert found == expected.get(norm, {"GroupNorm"})
    assert d(torch.randn(4, 1, 16, 16)).shape == (4,)


def test_unknown_family_and_norm_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model family"):
        build_generator("stylegan", channels=1, resolution=16)
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        build_discriminator("dcgan", channels=1, resolution=16, norm="weird")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_classes", [0, 4])
def test_generator_spectral_norm_is_optional(family, num_classes):
    kwargs = dict(channels=1, resolution=16, z_dim=8, width=8, num_classes=num_classes)
    plain = build_generator(family, **kwargs)
    normed = build_generator(family, spectral_norm=True, **kwargs)
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())
    assert any(hasattr(m, "parametrizations") for m in normed.modules())
    # conditional BatchNorm tables stay plain: normalising the zero shift table gives NaN
    for m in normed.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            assert not hasattr(m.scale, "parametrizations")
            assert not hasattr(m.shift, "parametrizations")
    labels = torch.tensor([0, 3]) if num_classes else None
    images = normed(torch.randn(2, 8), labels)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_projection_embeddings_start_at_the_family_init_scale():
    dcgan = build_discriminator("dcgan", channels=1, resolution=32, width=64, num_classes=10)
    resnet = build_discriminator("resnet", channels=1, resolution=32, width=64, num_classes=10)
    # DCGAN's N(0, 0.02), not nn.Embedding's N(0, 1), which would swamp the logit
    dcgan_std = dcgan.embed.parametrizations.weight.original.std().item()
    assert dcgan_std == pytest.approx(0.02, rel=0.1)
    resnet_bound = resnet.embed.parametrizations.weight.original.abs().max().item()
    assert resnet_bound <= (6 / (10 + resnet.embed.embedding_dim)) ** 0.5  # Xavier-uniform
