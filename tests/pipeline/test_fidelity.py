"""torch-fidelity numerics through our featurenet extractor, on real digits."""

import os

import pytest
import torch
import torch_fidelity

from pipeline.data import PreparedSplit
from pipeline.errors import EvaluationError
from pipeline.featurenet import train_featurenet
from pipeline.fidelity import (
    FEATURENET,
    INCEPTION,
    METRIC_KEYS,
    WeightsOnlyInceptionV3,
    compute,
    generated_images,
    real_images,
)
from pipeline.prepare import prepare
from tests.pipeline.test_evaluate import plant
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


def test_figures_equal_torch_fidelitys_own_uncached_computation(digits):
    """compute() applies torch-fidelity's metric functions to features it caches itself: the
    numbers must be calculate_metrics(cache=False)'s, cold cache and warm."""
    splits, weights, tmp = digits
    fake, real = generated_images(splits["test"]), real_images_of(splits["train"])
    options = dict(seed=0, batch_size=256, kid_subset_size=100, kid_subsets=10)
    reference = torch_fidelity.calculate_metrics(
        input1=fake, input2=real, cuda=torch.cuda.is_available(), batch_size=256,
        feature_extractor=FEATURENET, feature_extractor_weights_path=weights, cache=False,
        rng_seed=0, kid_subset_size=100, kid_subsets=10, prc_neighborhood=3, save_cpu_ram=True,
        verbose=False, fid=True, isc=True, kid=True, prc=True,
    )  # fmt: skip
    expected = {METRIC_KEYS[k]: float(v) for k, v in reference.items()}
    assert set(expected) == {"fid", "is", "is_std", "kid", "kid_std", "precision", "recall",
                             "f_score"}  # fmt: skip
    cache = tmp / "parity-cache"
    for _ in ("cold", "warm"):
        got = compute(
            fake, real, extractor=FEATURENET, weights=weights, metrics=("fid", "isc", "kid", "prc"),
            real_cache_name="parity", cache_dir=str(cache), **options,
        )  # fmt: skip
        assert got == pytest.approx(expected, rel=1e-6)  # equal on CPU; GPUs may round
    assert sorted(p.suffix for p in cache.iterdir()) == [".safetensors"] * 2


def test_inception_weights_load_weights_only_even_where_the_environment_forbids_it(
    tmp_path, monkeypatch
):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (a common workaround for old checkpoints) must neither
    unpickle Inception weights in full nor make torch refuse both settings at once."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    unsafe, marker = tmp_path / "unsafe.pth", tmp_path / "payload-ran"
    plant(unsafe, marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        WeightsOnlyInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(unsafe))
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
