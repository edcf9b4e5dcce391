"""The real-image feature cache (`evaluate.cache_dir`) runs no code and uses nothing damaged.

The cache directory is shared (on a cluster, the workspace): whoever can write to it must not
be able to run code in `ganpipe evaluate` or in a sweep trial. A pickle that creates a marker
file when unpickled is planted under every name the cache uses (torch-fidelity's old `.pt`
names and the files the cache writes); scoring must never create the marker and must give the
figures of an uncached computation. Damaged or tampered entries are recomputed, with a warning.
"""

import dataclasses
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gan.models import GeneratorSpec
from pipeline.data import PreparedSplit
from pipeline.errors import EvaluationError
from pipeline.featurenet import read_featurenet_info, train_featurenet
from pipeline.fidelity import FEATURENET, compute, generated_images, real_images
from pipeline.prepare import prepare
from pipeline.scoring import Scorer, TrialEvaluator, domain_extractor
from pipeline.shards import read_manifest
from pipeline.training.worker_config import TrialScoring
from tests.pipeline.test_evaluate import old_torch_fidelity_names, plant
from tests.pipeline.test_featurenet import digits_params

METRICS = ("fid", "isc", "kid", "prc")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared 8-px digits, a featurenet, and the train split as real and generated sets."""
    root = tmp_path_factory.mktemp("feature-cache")
    params = digits_params(root, epochs=2, min_skill=0.0)
    prepare(params)
    train_featurenet(params)
    pixels, _ = PreparedSplit(root / "prepared", "train").read()
    fake = torch.from_numpy(pixels[:300]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    fake = torch.roll(fake, 1, dims=3)  # not the real images, so every figure is non-trivial
    dataset_hash = read_manifest(root / "prepared")["dataset_hash"]
    return root, pixels, fake, dataset_hash


def scorer_for(root, dataset_hash, cache_dir):
    params = digits_params(root).evaluate.model_copy(
        update={"cache_dir": str(cache_dir), "kid_subset_size": 100, "kid_subsets": 5}
    )
    extractor = domain_extractor(root / "featurenet", read_featurenet_info(root / "featurenet"))
    return Scorer(params, {"domain": extractor}, dataset_hash)


def uncached(root, pixels, fake):
    """The figures with no cache at all: the reference every cached result must equal."""
    values = compute(
        generated_images(fake), real_images(pixels), extractor=FEATURENET,
        weights=str((root / "featurenet").resolve()), metrics=METRICS, real_cache_name=None,
        cache_dir=str(root / "never-used"), seed=0, batch_size=256, kid_subset_size=100,
        kid_subsets=5,
    )  # fmt: skip
    assert not (root / "never-used").exists()
    return {f"{k}_domain": v for k, v in values.items()}


def test_a_planted_pickle_never_runs_and_the_figures_stay_right(setup, tmp_path):
    root, pixels, fake, dataset_hash = setup
    reference = uncached(root, pixels, fake)
    # The names the cache itself writes: fill a cache once and take what appears there.
    filled = tmp_path / "filled"
    scorer_for(root, dataset_hash, filled).score(fake, real_images(pixels), "train", METRICS)
    written = sorted(p.name for p in filled.iterdir())
    assert written, "the real features were not cached"
    sha = read_featurenet_info(root / "featurenet")["weights_sha256"]
    cache, marker = tmp_path / "cache", tmp_path / "payload-ran"
    for name in {*written, *old_torch_fidelity_names(dataset_hash, sha)}:
        plant(cache / name, marker)
    scores = scorer_for(root, dataset_hash, cache).score(
        fake, real_images(pixels), "train", METRICS
    )
    assert not marker.exists()
    assert scores == pytest.approx(reference, rel=1e-6, abs=1e-9)
    # and a second call reads back what the first rewrote, with the same figures
    again = scorer_for(root, dataset_hash, cache).score(fake, real_images(pixels), "train", METRICS)
    assert again == pytest.approx(scores, rel=1e-6) and not marker.exists()


def test_the_sweep_trial_scorer_never_runs_a_planted_pickle(setup, tmp_path):
    root, pixels, _, dataset_hash = setup
    cache, marker = tmp_path / "cache", tmp_path / "payload-ran"
    sha = read_featurenet_info(root / "featurenet")["weights_sha256"]
    settings = TrialScoring(
        eval_samples=200, prepared=str(root / "prepared"), seed=0,
        featurenet=str((root / "featurenet").resolve()), cache_dir=str(cache),
        dataset_hash=dataset_hash,
    )  # fmt: skip
    spec = GeneratorSpec("dcgan", 1, 8, 8, 8)
    torch.manual_seed(0)
    generator = spec.build().eval()
    clean = TrialEvaluator(dataclasses.replace(settings, cache_dir=str(tmp_path / "clean")))(
        generator, spec
    )
    filled = sorted(p.name for p in (tmp_path / "clean").iterdir())
    for name in {*filled, *old_torch_fidelity_names(dataset_hash, sha)}:
        plant(cache / name, marker)
    scores = TrialEvaluator(settings)(generator, spec)
    assert not marker.exists()
    for key in ("fid_domain", "kid_domain", "class_coverage_domain"):
        assert scores[key] == pytest.approx(clean[key], rel=1e-6, abs=1e-9)


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _last_byte_flipped(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _features_altered(path):
    """Other numbers under the entry's own metadata (its sha256 no longer matches)."""
    with safe_open(str(path), framework="pt") as entry:
        metadata, tensor = entry.metadata(), entry.get_tensor("features")
    save_file({"features": tensor * 1.01}, str(path), metadata=metadata)


def _other_images(path):
    """A consistent entry (its checksum matches) made for other images under the same name."""
    with safe_open(str(path), framework="pt") as entry:
        metadata, tensor = entry.metadata(), entry.get_tensor("features")
    save_file({"features": tensor}, str(path), metadata={**metadata, "fingerprint": "0" * 64})


def _read_as_another_dtype(path):
    """A header saying float64 over the same bytes: the sha256 covers dtype and shape too."""
    with safe_open(str(path), framework="pt") as entry:
        metadata, tensor = entry.metadata(), entry.get_tensor("features")
    save_file({"features": tensor.view(torch.float64)}, str(path), metadata=metadata)


def _old_format(path):
    with safe_open(str(path), framework="pt") as entry:
        metadata, tensor = entry.metadata(), entry.get_tensor("features")
    save_file(
        {"features": tensor}, str(path), metadata={**metadata, "format": "ganpipe-features-0"}
    )


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (_truncated, "not a readable safetensors entry"),
        (_last_byte_flipped, "do not match their sha256"),
        (_features_altered, "do not match their sha256"),
        (_other_images, "made for other data.*fingerprint"),
        (_read_as_another_dtype, "do not match their sha256"),
        (_old_format, "made for other data.*format"),
        (lambda path: path.write_bytes(b""), "not a readable safetensors entry"),
    ],
)
def test_a_damaged_or_tampered_entry_is_recomputed_with_a_warning(
    setup, tmp_path, caplog, tamper, why
):
    root, pixels, fake, dataset_hash = setup
    cache = tmp_path / "cache"
    scorer = scorer_for(root, dataset_hash, cache)
    clean = scorer.score(fake, real_images(pixels), "train", ("fid", "kid"))
    (entry,) = cache.iterdir()  # the featurenet's "features" layer
    tamper(entry)
    with caplog.at_level(logging.WARNING, logger="pipeline.fidelity"):
        scores = scorer.score(fake, real_images(pixels), "train", ("fid", "kid"))
    assert scores == pytest.approx(clean, rel=1e-6)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "pipeline.fidelity"]
    assert re.search(f"feature cache entry {re.escape(str(entry))} is not used: .*{why}", warning)
    assert warning.endswith("recomputing it")
    # the entry was rewritten sound: the next call reads it and leaves it alone
    caplog.clear()
    written = entry.stat().st_mtime_ns, entry.stat().st_ino
    with caplog.at_level(logging.WARNING, logger="pipeline.fidelity"):
        again = scorer.score(fake, real_images(pixels), "train", ("fid", "kid"))
    assert again == pytest.approx(clean, rel=1e-6)
    assert (entry.stat().st_mtime_ns, entry.stat().st_ino) == written and not caplog.records


def test_a_cache_entry_is_read_back_instead_of_recomputed_and_names_stay_in_the_cache(
    setup, tmp_path
):
    root, pixels, fake, dataset_hash = setup
    cache = tmp_path / "cache"
    scorer = scorer_for(root, dataset_hash, cache)
    first = scorer.score(fake, real_images(pixels), "train", METRICS)
    entries = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in cache.iterdir()}
    assert sorted(p.suffix for p in entries) == [".safetensors", ".safetensors"]  # two layers
    assert scorer.score(fake, real_images(pixels), "train", METRICS) == pytest.approx(first)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in cache.iterdir()} == entries
    # other images under the same name are told apart, not scored with the cached features
    fewer = pixels[:700]
    scores = scorer.score(fake, real_images(fewer), "train", ("fid",))
    assert scores["fid_domain"] == pytest.approx(uncached(root, fewer, fake)["fid_domain"])
    assert scores["fid_domain"] != pytest.approx(first["fid_domain"])
    with pytest.raises(EvaluationError, match="feature cache name '../x' must be letters"):
        compute(
            generated_images(fake), real_images(pixels), extractor=FEATURENET,
            weights=str((root / "featurenet").resolve()), metrics=("fid",), real_cache_name="../x",
            cache_dir=str(cache), seed=0, batch_size=256,
        )  # fmt: skip


def test_a_cache_directory_that_cannot_be_written_costs_a_warning_not_the_result(
    setup, tmp_path, caplog
):
    root, pixels, fake, dataset_hash = setup
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="pipeline.fidelity"):
        scores = scorer_for(root, dataset_hash, cache).score(
            fake, real_images(pixels), "train", ("fid",)
        )
    assert scores["fid_domain"] == pytest.approx(uncached(root, pixels, fake)["fid_domain"])
    assert any("could not be written" in r.getMessage() for r in caplog.records)
