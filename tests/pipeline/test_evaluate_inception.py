"""The Inception-v3 path of the evaluate stage, without a download: weights of the right
shapes are saved from a randomly initialised copy of torch-fidelity's own network (the
scores are meaningless; the plumbing is what is tested). A handful of RGB images keeps
Inception's ~10 images/s on CPU affordable."""

import functools
import hashlib
import http.server
import json
import math
import pickle
import shutil
import threading

import pytest
import torch
import torch_fidelity

import pipeline.fidelity
from pipeline.errors import EvaluationError
from pipeline.evaluate import evaluate
from pipeline.featurenet import train_featurenet
from pipeline.fidelity import WeightsOnlyInceptionV3, save_random_inception_weights
from pipeline.prepare import prepare
from tests.pipeline.test_evaluate import MarkerPickle, eval_params, save_candidates

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    save_random_inception_weights(path)
    return path


@pytest.fixture
def rgb_setup(tmp_path, image_folder):
    def params(**evaluate):
        return eval_params(
            tmp_path,
            prepare_={"source": "imagefolder", "image_dir": str(image_folder), "channels": 3},
            featurenet={"epochs": 2, "min_skill": 0.0},
            evaluate={
                "num_samples": 8,
                "kid_subset_size": 4,
                "kid_subsets": 2,
                "batch_size": 8,
                **evaluate,
            },  # fmt: skip
        )

    base = params()
    prepare(base)
    train_featurenet(base)
    save_candidates(base, [("plain", {}, 1)])
    return params


def test_inception_metrics_with_local_weights(rgb_setup, random_inception_weights, tmp_path):
    report = evaluate(rgb_setup(inception=True, inception_weights=str(random_inception_weights)))
    scores = report["candidates"]["plain"]
    for metric in ("fid", "is", "kid", "precision", "recall"):
        assert isinstance(scores[f"{metric}_inception"], float)
        assert isinstance(scores[f"{metric}_domain"], float)
    assert "fid_floor_inception" in report["sanity"] and "fid_ceiling_inception" in scores
    extractors = report["protocol"]["feature_extractors"]
    assert extractors["inception"]["name"] == "inception-v3-compat"
    assert len(extractors["inception"]["sha256"]) == 64
    assert report["inception"]["status"] == "computed"
    shown = json.loads((tmp_path / "metrics" / "evaluate" / "c1.json").read_text())
    finite = {
        m
        for m in ("fid", "is", "kid", "precision", "recall")
        if math.isfinite(scores[f"{m}_inception"])
    }  # random weights: IS may be NaN
    assert "fid" in finite and set(shown["inception"]) == finite
    assert "fid" in shown and "inception" in json.loads(
        (tmp_path / "metrics" / "evaluate" / "real.json").read_text())  # fmt: skip


def test_inception_skipped_with_a_recorded_reason_when_weights_cannot_be_had(
    rgb_setup, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached download
    monkeypatch.setattr(pipeline.fidelity, "URL_INCEPTION_V3", "http://127.0.0.1:9/w.pth")
    report = evaluate(rgb_setup(inception=True))
    assert report["inception"]["status"] == "skipped"
    assert "set evaluate.inception_weights" in report["inception"]["reason"]
    assert "fid_domain" in report["candidates"]["plain"]
    assert not any(k.endswith("_inception") for k in report["candidates"]["plain"])
    written = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert written["inception"] == report["inception"]


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving the files of a directory (a stand-in for GitHub)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_inception_weights_are_downloaded_into_the_hub_cache_and_checked(
    rgb_setup, tmp_path, monkeypatch, served, random_inception_weights
):
    root, base = served
    digest = hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # empty: no checkpoints dir
    for name, prefix in (("inception-00000000.pth", "bad"), (f"inception-{digest[:8]}.pth", "ok")):
        shutil.copy(random_inception_weights, root / name)
        monkeypatch.setattr(pipeline.fidelity, "URL_INCEPTION_V3", f"{base}/{name}")
        report = evaluate(rgb_setup(inception=True))
        cached = tmp_path / "torch-home" / "hub" / "checkpoints" / name
        if prefix == "bad":  # the file name promises another sha256: refused, not cached
            assert report["inception"]["status"] == "skipped"
            assert "invalid hash value" in report["inception"]["reason"]
            assert not cached.exists()
        else:
            assert report["inception"] == {"status": "computed", "weights": str(cached)}
            assert "fid_inception" in report["candidates"]["plain"]


def test_wrong_or_unsafe_inception_weights_fail_clearly(rgb_setup, tmp_path):
    wrong_shapes = tmp_path / "small.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), wrong_shapes)
    with pytest.raises(EvaluationError, match="not torch-fidelity's Inception-v3 state dict"):
        evaluate(rgb_setup(inception=True, inception_weights=str(wrong_shapes)))
    unsafe = tmp_path / "unsafe.pth"
    marker = tmp_path / "payload-ran"
    unsafe.write_bytes(pickle.dumps(MarkerPickle(marker)))
    with pytest.raises(EvaluationError, match="not torch-fidelity's Inception-v3 state dict"):
        evaluate(rgb_setup(inception=True, inception_weights=str(unsafe)))
    assert not (tmp_path / "evaluate" / "report.json").exists()
    assert not (tmp_path / "metrics" / "evaluate").exists()
    assert not marker.exists()
    # torch-fidelity itself builds this class, so a file swapped after the check is safe too.
    registry = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    assert registry["inception-v3-compat"] is WeightsOnlyInceptionV3
    with pytest.raises(Exception, match="Weights only load failed"):
        WeightsOnlyInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(unsafe)
        )
    assert not marker.exists()
