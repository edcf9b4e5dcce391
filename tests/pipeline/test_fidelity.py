"""torch-fidelity numerics through our featurenet extractor, on real digits."""

import pytest
import torch

from pipeline.data import PreparedSplit
from pipeline.errors import EvaluationError
from pipeline.featurenet import train_featurenet
from pipeline.fidelity import FEATURENET, compute, generated_images, real_images
from pipeline.prepare import prepare
from tests.pipeline.test_featurenet import digits_params


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real digits (train, test) as float images in [-1, 1], and the featurenet weights dir."""
    tmp = tmp_path_factory.mktemp("fidelity")
    params = digits_params(tmp, epochs=8)
    prepare(params)
    train_featurenet(params)
    splits = {}
    for split in ("train", "test"):
        pixels, _ = PreparedSplit(tmp / "prepared", split).read()
        splits[split] = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return splits, str(tmp / "featurenet"), tmp


def score(generated, real, weights, cache_dir, metrics=("fid",), **kwargs):
    return compute(
        generated_images(generated), real_images_of(real), extractor=FEATURENET,
        weights=weights, metrics=metrics, real_cache_name=None, cache_dir=str(cache_dir),
        seed=0, batch_size=256, **kwargs,
    )  # fmt: skip


def real_images_of(images):
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return real_images(pixels)


def test_fid_of_a_set_against_itself_is_zero_and_shifted_sets_score_worse(digits):
    splits, weights, tmp = digits
    train = splits["train"]
    same = score(train, train, weights, tmp / "cache")["fid"]
    assert abs(same) < 1e-3
    held_out = score(splits["test"], train, weights, tmp / "cache")["fid"]
    shifted = score(torch.roll(splits["test"], 2, dims=3), train, weights, tmp / "cache")["fid"]
    noisy = score(
        (splits["test"] + 0.5 * torch.randn_like(splits["test"])).clamp(-1, 1),
        train, weights, tmp / "cache",
    )["fid"]  # fmt: skip
    assert 0 < held_out < shifted
    assert held_out < noisy


def test_is_kid_and_precision_recall_order_real_above_noise(digits):
    splits, weights, tmp = digits
    metrics = ("fid", "isc", "kid", "prc")
    real = score(splits["test"], splits["train"], weights, tmp / "c", metrics, kid_subset_size=100)
    noise = torch.rand_like(splits["test"]) * 2 - 1
    fake = score(noise, splits["train"], weights, tmp / "c", metrics, kid_subset_size=100)
    assert real["is"] > 5 > fake["is"]  # 10 classes: near 10 when every class is clear
    assert real["kid"] < fake["kid"]
    assert real["precision"] > 0.8 > fake["precision"]
    assert real["recall"] > fake["recall"]


def test_too_few_samples_for_the_kid_subset_is_a_clear_error(digits):
    splits, weights, tmp = digits
    with pytest.raises(EvaluationError, match="kid_subset_size \\(1000\\) exceeds the 359 images"):
        score(splits["test"], splits["train"], weights, tmp / "c", ("kid",), kid_subset_size=1000)
