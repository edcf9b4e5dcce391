import subprocess
import sys

import numpy as np
import pytest
import torch

from gan.models import GeneratorSpec
from gan.sampling import (
    INTERPOLATIONS,
    LatentSampler,
    check_truncation,
    fixed_latents,
    generate,
    interpolate,
    interpolate_latents,
    mix_seed,
    seed_latent,
    step_generator,
    truncate,
)


def test_step_generator_is_reproducible_and_distinct_per_rank_and_step():
    draw = lambda seed, rank, step: torch.randn(4, generator=step_generator(seed, rank, step))  # noqa: E731
    torch.testing.assert_close(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.allclose(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.allclose(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.allclose(draw(0, 0, 5), draw(1, 0, 5))


def test_mix_seed_is_stable_across_processes():
    # A fresh interpreter (another hash seed) must derive the same seed: resumption relies on it.
    code = "from gan.sampling import mix_seed; print(mix_seed(7, 1, 123))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == mix_seed(7, 1, 123)
    assert 0 <= mix_seed(2**70, -1) < 2**63


def test_latent_sampler_shapes_and_labels():
    z, labels = LatentSampler(16, num_classes=10)(500, step_generator(0, 0, 0))
    assert z.shape == (500, 16) and labels.shape == (500,) and labels.dtype == torch.long
    assert set(labels.tolist()) == set(range(10))
    z, labels = LatentSampler(16)(3, step_generator(0, 0, 0))
    assert labels is None


def test_fixed_latents_are_the_same_everywhere_and_cycle_classes():
    a, la = fixed_latents(12, 8, num_classes=5, seed=3)
    torch.manual_seed(999)  # the global RNG must not matter
    b, lb = fixed_latents(12, 8, num_classes=5, seed=3)
    torch.testing.assert_close(a, b)
    assert la.tolist() == lb.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


SPEC = GeneratorSpec("dcgan", 1, 16, 16, 8)


def tiny_generator(spec: GeneratorSpec = SPEC) -> torch.nn.Module:
    """Weights drawn with a spread that makes images differ visibly (a fresh init gives outputs
    near 0, and conditional BatchNorm that ignores the class)."""
    torch.manual_seed(0)
    generator = spec.build().eval()
    with torch.no_grad():
        for p in generator.parameters():
            p.normal_(0, 0.2)
    return generator


def test_truncation_one_gives_the_untruncated_images_bit_for_bit():
    g = tiny_generator()
    z, _ = fixed_latents(6, SPEC.z_dim, seed=3)
    with torch.no_grad():
        today = g(z, None)  # what generate drew before truncation existed
    assert torch.equal(generate(g, 6, SPEC.z_dim, seed=3), today)
    assert torch.equal(generate(g, 6, SPEC.z_dim, seed=3, truncation=1.0), today)
    assert truncate(z, 1) is z


@pytest.mark.parametrize("psi", [0.0, 0.5, 0.7])
def test_truncation_pulls_the_noise_toward_its_mean(psi):
    g = tiny_generator()
    z, _ = fixed_latents(6, SPEC.z_dim, seed=3)
    torch.testing.assert_close(truncate(z, psi), z * psi, rtol=0, atol=0)
    assert torch.equal(truncate(z, psi).norm(dim=1), (z * psi).norm(dim=1))
    with torch.no_grad():
        expected = g(z * psi, None)
    images = generate(g, 6, SPEC.z_dim, seed=3, truncation=psi)
    assert torch.equal(images, expected)
    assert not torch.equal(images, generate(g, 6, SPEC.z_dim, seed=3))
    if psi == 0:  # every sample is G(0)
        assert torch.equal(images, images[:1].expand_as(images))


@pytest.mark.parametrize(
    ("psi", "message"),
    [
        (1.5, r"truncation must be from 0 to 1 \(psi: 1 changes nothing.*got 1.5"),
        (-0.1, "truncation must be from 0 to 1 .* got -0.1"),
        (float("nan"), "truncation must be from 0 to 1 .* got nan"),
        (True, r"truncation must be a number from 0 to 1 \(1 changes nothing\), got True \(bool"),
        ("0.5", r"truncation must be a number from 0 to 1 .*, got '0.5' \(str\)"),
    ],
)
def test_truncation_outside_0_to_1_is_refused(psi, message):
    with pytest.raises(ValueError, match=message):
        check_truncation(psi)
    with pytest.raises(ValueError, match=message):
        generate(tiny_generator(), 2, SPEC.z_dim, truncation=psi)
    assert check_truncation(np.float64(0.25)) == 0.25 and check_truncation(1) == 1.0


@pytest.mark.parametrize("method", sorted(INTERPOLATIONS))
def test_interpolation_starts_and_ends_at_the_two_seeds_noise(method):
    a, b = seed_latent(1, 16), seed_latent(2, 16)
    assert torch.equal(a, fixed_latents(1, 16, seed=1)[0][0])  # what sample(1, seed=1) draws
    z = interpolate_latents(a, b, 7, method)
    assert z.shape == (7, 16) and z.dtype == a.dtype
    assert torch.equal(z[0], a) and torch.equal(z[-1], b)  # bit for bit
    assert not torch.allclose(z[3], a) and not torch.allclose(z[3], b)
    # the images: the seeds' own single samples (to rounding: a batch of 7 is not a batch of 1)
    g = tiny_generator()
    frames = interpolate(g, 16, 0, 1, 2, 7, method, truncation=0.6)
    for frame, seed in ((frames[0], 1), (frames[-1], 2)):
        own = generate(g, 1, 16, seed=seed, truncation=0.6)[0]
        torch.testing.assert_close(frame, own, rtol=0, atol=1e-5)


def test_slerp_keeps_the_norm_between_the_endpoints_where_lerp_shrinks_it():
    a, b = seed_latent(1, 64), seed_latent(2, 64)
    low, high = sorted((a.norm().item(), b.norm().item()))
    slerp = interpolate_latents(a, b, 9, "slerp").norm(dim=1)
    assert (slerp >= low - 1e-5).all() and (slerp <= high + 1e-5).all()
    # the norm moves linearly from |a| to |b|
    expected = torch.linspace(a.norm().item(), b.norm().item(), 9)
    torch.testing.assert_close(slerp, expected, rtol=1e-5, atol=1e-5)
    lerp = interpolate_latents(a, b, 9, "lerp").norm(dim=1)
    assert lerp[4] < 0.8 * low  # near-orthogonal draws: the midpoint is ~1/sqrt(2) as long


def test_slerp_follows_the_great_circle():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    z = interpolate_latents(e1, e2, 3, "slerp")  # 90 degrees apart, norms 1 and 2
    half = 1.5 / 2**0.5  # at 45 degrees, of norm (1 + 2) / 2
    torch.testing.assert_close(z[1], torch.tensor([half, half, 0.0]))
    # parallel endpoints: no circle, a straight line (no NaN)
    z = interpolate_latents(e1, 3 * e1, 3, "slerp")
    torch.testing.assert_close(z[1], 2 * e1)


def test_bad_interpolations_are_refused():
    a = seed_latent(0, 8)
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic'; expected one of"):
        interpolate_latents(a, a, 4, "cubic")
    with pytest.raises(ValueError, match="steps must be an integer of at least 2, got 1"):
        interpolate_latents(a, a, 1)
    with pytest.raises(ValueError, match="two vectors of one length"):
        interpolate_latents(a, seed_latent(0, 9), 4)


def test_interpolation_keeps_one_label_for_conditional_models():
    spec = GeneratorSpec("dcgan", 1, 16, 16, 8, num_classes=10)
    g = tiny_generator(spec)
    frames = interpolate(g, 16, 10, 1, 2, 4, label=3)
    torch.testing.assert_close(
        frames[0], generate(g, 1, 16, 10, seed=1, label=3)[0], atol=1e-5, rtol=0
    )
    default = interpolate(g, 16, 10, 1, 2, 4)  # class 0, as generate(..., 1) gives
    torch.testing.assert_close(default[-1], generate(g, 1, 16, 10, seed=2)[0], atol=1e-5, rtol=0)
    assert not torch.allclose(frames, default)
    with pytest.raises(ValueError, match=r"label 10 is outside the model's classes 0..9"):
        interpolate(g, 16, 10, 1, 2, 4, label=10)
