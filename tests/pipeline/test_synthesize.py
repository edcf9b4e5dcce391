"""`ganpipe synthesize`: labeled datasets from registered generators, balanced or weighted
(conditional) or pseudo-labeled (unconditional), as an image folder prepare reads back or as
prepared shards, with provenance; resumable after a kill, atomic, and never over a user's
files. prepare recognises synthetic images and refuses to mix them into real data unless
asked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.errors import SynthesisError
from pipeline.featurenet import train_featurenet
from pipeline.files import OutputError
from pipeline.prepare import prepare
from pipeline.registry import register
from pipeline.sources import PNG_KEY, SourceError
from pipeline.synthesize import (
    PROVENANCE,
    SynthesisRequest,
    class_counts,
    folder_names,
    staging_path,
    synthesize,
)
from tests.conftest import tree_digest
from tests.pipeline.test_registry import CONDITIONAL_SPEC, evaluation

PLAIN, CONDITIONAL = "models:/ganpipe-generator@champion", "models:/conditional@champion"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry with an unconditional and a conditional generator (random weights, 16 px
    grayscale, 10 classes), and digits prepared with a featurenet (the pseudo-labeler)."""
    root = tmp_path_factory.mktemp("synthesize")
    db = root / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        register(evaluation(root / "plain", {"plain": {"fid_domain": 10.0}}, db))
        register(evaluation(root / "cond", {"cond": {"fid_domain": 9.0}}, db,
                            spec=CONDITIONAL_SPEC, model_name="conditional"))  # fmt: skip
    params = validate_params({
        "prepare": {"out_dir": str(root / "prepared")},
        "featurenet": {"out_dir": str(root / "featurenet"), "epochs": 4, "min_skill": 0,
                       "metrics_file": str(root / "featurenet.json")},
    })  # fmt: skip
    prepare(params, progress=False)
    train_featurenet(params)
    return {"root": root, "uri": f"sqlite:///{db}", "featurenet": str(root / "featurenet")}


def request(world, out, model=CONDITIONAL, **options) -> SynthesisRequest:
    options.setdefault("featurenet_dir", world["featurenet"])
    return SynthesisRequest(model, out=str(out), tracking_uri=world["uri"], **options)


def class_digests(root: Path) -> dict[str, str]:
    return {d.name: tree_digest(d) for d in sorted(root.iterdir()) if d.is_dir()}


def files_by_class(root: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.png"))) for d in sorted(root.iterdir()) if d.is_dir()}


def test_class_counts_share_out_by_largest_remainder():
    assert class_counts(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert class_counts(7, [0, 1, 2]).tolist() == [0, 2, 5]
    assert class_counts(5, [1] * 5).tolist() == [1] * 5
    assert folder_names(["T-shirt/top", ".hidden", "a", "a"]) == ["T-shirt_top", "hidden", "a",
                                                                  "a_3"]  # fmt: skip


def test_a_conditional_generator_writes_a_balanced_image_folder_that_prepare_reads_back(
    world, tmp_path
):
    made = synthesize(request(world, tmp_path / "set", num_images=205, chunk_size=64),
                      progress=False)  # fmt: skip
    out = tmp_path / "set"
    counts = files_by_class(out)
    assert list(counts) == [str(k) for k in range(10)]
    assert sorted(counts.values()) == [20] * 5 + [21] * 5  # 205 over 10 classes
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance == made
    assert provenance["model_uri"] == CONDITIONAL and provenance["model_version"] == "1"
    assert len(provenance["weights_sha256"]) == 64 and provenance["labels"]["source"] == (
        "conditioning")  # fmt: skip
    assert (provenance["drawn"], provenance["rejected"], provenance["seed"]) == (205, 0, 0)
    with Image.open(next((out / "3").glob("*.png"))) as image:
        mark = json.loads(image.info[PNG_KEY])
    assert mark["weights_sha256"] == provenance["weights_sha256"] and "index" in mark
    assert not staging_path(out).exists()

    params = validate_params({"prepare": {"source": "imagefolder", "image_dir": str(out),
                                          "out_dir": str(tmp_path / "prepared")}})  # fmt: skip
    manifest = prepare(params, progress=False)
    rows = {name: split["rows"] for name, split in manifest["splits"].items()}
    assert sum(rows.values()) == 205 and manifest["class_names"] == [str(k) for k in range(10)]
    assert manifest["synthetic"]["rows"] == rows  # all of it, marked
    (source,) = manifest["synthetic"]["sources"]
    assert source["weights_sha256"] == provenance["weights_sha256"] and source["images"] == 205


def test_the_same_request_gives_the_same_images_and_weights_skew_the_classes(world, tmp_path):
    first = request(world, tmp_path / "a", num_images=50, chunk_size=16, seed=3)
    synthesize(first, progress=False)
    synthesize(request(world, tmp_path / "b", num_images=50, chunk_size=16, seed=3),
               progress=False)  # fmt: skip
    assert class_digests(tmp_path / "a") == class_digests(tmp_path / "b")
    weighted = synthesize(
        request(world, tmp_path / "w", num_images=40, class_weights=(3,) + (1,) * 9),
        progress=False,
    )  # fmt: skip
    assert weighted["class_counts"]["0"] == 10 and sum(weighted["class_counts"].values()) == 40
    with pytest.raises(SynthesisError, match="3 class weights given, but .* has 10 classes"):
        synthesize(request(world, tmp_path / "x", num_images=4, class_weights=(1, 1, 1)))


def test_parquet_output_is_a_prepared_dataset_with_provenance(world, tmp_path):
    synthesize(request(world, tmp_path / "shards", num_images=130, format="parquet",
                       chunk_size=50), progress=False)  # fmt: skip
    split = PreparedSplit(tmp_path / "shards", "train")  # verified: checksums, schema, labels
    images, labels = split.read()
    assert images.shape == (130, 16, 16, 1) and np.bincount(labels).tolist() == [13] * 10
    assert split.manifest["synthetic"]["rows"] == {"train": 130}
    assert len(split.shards) == 3  # one shard per chunk
    assert json.loads((tmp_path / "shards" / PROVENANCE).read_text())["num_images"] == 130


def test_an_unconditional_generator_is_labeled_by_the_featurenet_and_reports_rejections(
    world, tmp_path
):
    made = synthesize(request(world, tmp_path / "u", PLAIN, num_images=60, min_confidence=0.3,
                              chunk_size=256), progress=False)  # fmt: skip
    assert made["labels"]["source"] == "featurenet pseudo-labels"
    assert made["labels"]["min_confidence"] == 0.3
    assert len(made["labels"]["featurenet_weights_sha256"]) == 64
    assert made["drawn"] == 256 * -(-made["drawn"] // 256) and made["drawn"] >= 60
    assert made["rejected"] == made["drawn"] - 60
    assert made["rejected_share"] == pytest.approx(made["rejected"] / made["drawn"], abs=1e-6)
    assert sum(files_by_class(tmp_path / "u").values()) == 60
    with pytest.raises(SynthesisError, match="fewer than 1 in 50 reach --min-confidence"):
        synthesize(request(world, tmp_path / "never", PLAIN, num_images=2, min_confidence=0.99999,
                           chunk_size=2), progress=False)  # fmt: skip
    assert not (tmp_path / "never").exists()
    with pytest.raises(SynthesisError, match="cannot be used"):
        synthesize(request(world, tmp_path / "n", PLAIN, num_images=2,
                           featurenet_dir=str(tmp_path / "none")))  # fmt: skip


@pytest.mark.slow
def test_a_killed_synthesis_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
    world, tmp_path
):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pipeline", "synthesize", "--model", CONDITIONAL, "--num",
               "3000", "--chunk-size", "100", "--out", str(out)]  # fmt: skip
    env = os.environ | {"MLFLOW_TRACKING_URI": world["uri"]}
    (tmp_path / "params.yaml").write_text("{}\n")  # the defaults
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    progress = staging_path(out) / ".ganpipe-synthesize.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads(progress.read_text())["chunks"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()  # nothing half-written where the user looks
    first = min((staging_path(out) / "0").iterdir())
    inode = first.stat().st_ino
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "0" / first.name).stat().st_ino == inode  # kept, not drawn again
    whole = tmp_path / "whole"
    synthesize(request(world, whole, num_images=3000, chunk_size=100), progress=False)
    assert class_digests(out) == class_digests(whole)


def test_synthesize_never_writes_over_a_users_files(world, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match="thesis.txt"):
        synthesize(request(world, mine, num_images=4))
    assert (mine / "thesis.txt").read_text() == "years of work"
    stray = staging_path(tmp_path / "new")
    stray.mkdir()
    (stray / "x").write_text("not ours")
    with pytest.raises(SynthesisError, match="no record of an interrupted"):
        synthesize(request(world, tmp_path / "new", num_images=4))
    assert (stray / "x").exists()


def test_the_cli_writes_a_dataset_and_refuses_bad_arguments(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    code = main(["synthesize", "--model", CONDITIONAL, "--num", "20", "--out",
                 str(tmp_path / "cli"), "--format", "parquet", "--truncation", "0.5"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "20 images from models:/conditional@champion (version 1" in printed
    assert json.loads((tmp_path / "cli" / PROVENANCE).read_text())["truncation"] == 0.5
    with pytest.raises(SystemExit) as exit_:
        main(["synthesize", "--num", "2", "--out", "x", "--class-weights", "1,a"])
    assert exit_.value.code == 2
    assert "one per class" in capsys.readouterr().err


def test_prepare_refuses_synthetic_images_mixed_with_real_ones_unless_asked(
    world, tmp_path, image_folder
):
    synthesize(request(world, tmp_path / "s", num_images=30), progress=False)
    for folder in image_folder.iterdir():  # copy synthetic images in among the real ones
        for image in list((tmp_path / "s" / "1").iterdir())[:3]:
            (folder / f"gan-{image.name}").write_bytes(image.read_bytes())
    settings = {"source": "imagefolder", "image_dir": str(image_folder), "channels": 1,
                "out_dir": str(tmp_path / "prepared")}  # fmt: skip
    with pytest.raises(SourceError, match=r"mixes 9 images written by `ganpipe synthesize`"):
        prepare(validate_params({"prepare": settings}), progress=False)
    assert not (tmp_path / "prepared").exists()
    manifest = prepare(validate_params({"prepare": settings | {"allow_synthetic": True}}),
                       progress=False)  # fmt: skip
    assert manifest["synthetic"]["rows"] == {"train": 9, "test": 0}  # a test split stays real
    assert manifest["synthetic"]["sources"][0]["model_uri"] == CONDITIONAL
