"""The DVC metrics files: numbers under short names only, a `dvc metrics show` table that fits
120 columns for the default pipeline (checked with DVC itself), and a directory that is
replaced as a whole but never over files ganpipe did not write."""

import json
import math
import shutil
import subprocess

import pytest

from pipeline.artifacts import TRAIN_METRICS
from pipeline.config import Params
from pipeline.files import OutputError, write_json
from pipeline.metrics_files import (
    evaluation_metrics,
    featurenet_metrics,
    train_metrics,
    write_metrics_dir,
)

HASH = "eca84a65af8e053d49ec1ae10f82db39cd6df40b3db37c57d9d66784d591b5f7"
DOMAIN = {  # one generator's scores as the evaluate stage records them (digits, 3,000 steps)
    "is_domain": 5.099251242946916, "is_std_domain": 0.1556458214952528,
    "fid_domain": 4.304325139672471, "kid_domain": 0.26583013534545896,
    "kid_std_domain": 0.03668528308055119, "precision_domain": 0.515999972820282,
    "recall_domain": 0.8929068446159363, "f_score_domain": 0.6540388645308329,
    "class_coverage_domain": 1.0,
}  # fmt: skip


def report(*names: str, **extra) -> dict:
    """A small evaluation report in the evaluate stage's layout, provenance included."""
    candidates = {
        name: {
            "diverged": False, "steps": 3000, "mlflow_run_id": "51688a74695644e9aeee97cc2eb7a8b7",
            **DOMAIN, "fid_ceiling_domain": 1436.9186314050871, "generator": "ema",
            "generator_choice": {"rule": "best", "metric": "fid_domain", "gap_flagged": False,
                                 "gap": "raw fid_domain 4.397 vs ema 4.304 (1.02x worse)"},
            "by_generator": {"ema": DOMAIN, "raw": DOMAIN},
            **extra,
        }
        for name in names
    }  # fmt: skip
    return {
        "protocol": {"id": HASH, "ids": {"domain": HASH}, "dataset_hash": HASH, "seed": 0},
        "sanity": {"fid_floor_domain": 0.7991751329561794, "is_real_domain": 7.560671786053898,
                   "is_real_std_domain": 0.6444148048602661},
        "candidates": candidates,
        "inception": {"status": "off", "reason": "evaluate.inception is false"},
        "featurenet": {"available": True, "test_accuracy": 0.99, "domain_trust": "high"},
        "timings": {"floor_s": 1.45, **{f"candidate_s.{n}": 10.434 for n in names}},
    }  # fmt: skip


FEATURENET = {  # the featurenet stage's report
    "available": True, "test_accuracy": 0.9916434540389972, "train_accuracy": 1.0,
    "chance_accuracy": 0.116991643454039, "test_skill": 0.9905362776025237,
    "domain_trust": "high", "domain_trust_meaning": "the classes are well separated",
    "train_seconds": 14.16, "num_classes": 10, "train_images": 1438, "test_images": 359,
}  # fmt: skip
SINGLE_RUN = {  # a single run's result.json
    "run_name": "gan-dcgan-a8897ee1c9d3", "mlflow_run_id": "51688a74695644e9aeee97cc2eb7a8b7",
    "dataset_hash": HASH, "diverged": False, "diverged_at_step": None,
    "checkpoint": "/work/runs/gan-dcgan-a8897ee1c9d3/checkpoint_2026-12-01_18-09-06.157681",
    "steps": 3000, "global_batch_size": 64, "candidates": [{"name": "gan-dcgan-a8897ee1c9d3"}],
    "final_metrics": {"loss_d": 0.92, "loss_g": 0.72, "d_real": 0.58, "step": 3000,
                      "images_per_s": 672.3722548514021},
}  # fmt: skip


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def test_the_metrics_hold_the_chosen_generators_figures_under_short_names_only():
    files = evaluation_metrics(report("gan-dcgan-a8897ee1c9d3", "gan-dcgan-0c1d2e3f4a5b"))
    assert files["c1"] == {
        "fid": 4.304, "is": 5.099, "kid": 0.2658, "precision": 0.516, "recall": 0.8929,
        "coverage": 1.0, "seconds": 10.43,
    }  # fmt: skip
    assert files["c2"] == files["c1"]  # a row per candidate: the same keys
    assert files["real"] == {"fid": 0.7992, "is": 7.561, "seconds": 1.45}  # the floor
    assert featurenet_metrics(FEATURENET) == {"accuracy": 0.9916, "seconds": 14.16}
    assert train_metrics(SINGLE_RUN) == {"images/s": 672.4}
    every = [*files.values(), featurenet_metrics(FEATURENET), train_metrics(SINGLE_RUN)]
    for key, value in (leaf for contents in every for leaf in leaves(contents)):
        assert len(key) <= 14 and key.replace("/", "").replace(".", "").replace("_", "").isalpha()
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value)


def test_task_figures_inception_a_sweep_and_non_finite_values():
    conditional = {
        "label_accuracy_domain": 0.93,
        "cas_accuracy": 0.875,
        "fid_class_mean_domain": 12.345678,
        "fid_class3_domain": 9.0,
        "fid_inception": 31.25,
        "precision_inception": 0.6,
        "kid_domain": math.nan,
    }
    (c1,) = [v for k, v in evaluation_metrics(report("a", **conditional)).items() if k == "c1"]
    assert c1["accuracy"] == 0.93 and c1["cas"] == 0.875 and c1["fid_class"] == 12.35
    assert c1["inception"] == {"fid": 31.25, "precision": 0.6}
    assert "kid" not in c1  # a diverged candidate's NaN is left out, not written as NaN
    sweep = {"trials": [{"trial_id": "1"}, {"trial_id": "2"}, {}], "trial_steps": 500}
    assert train_metrics(sweep) == {"steps": 500}
    assert featurenet_metrics({"available": False, "reason": "unlabeled"}) == {}


def test_write_metrics_dir_replaces_the_whole_directory_but_no_foreign_file(tmp_path):
    directory = tmp_path / "metrics" / "evaluate"
    write_metrics_dir(directory, {"c1": {"fid": 1.0}, "c2": {"fid": 2.0}, "real": {}}, "e", "k")
    write_metrics_dir(directory, {"c1": {"fid": 3.0}, "real": {}}, "e", "k")  # one candidate
    assert sorted(p.name for p in directory.iterdir()) == ["c1.json", "real.json"]
    assert json.loads((directory / "c1.json").read_text()) == {"fid": 3.0}
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"k .*holds notes.txt, which the e stage did not"):
        write_metrics_dir(directory, {"c1": {"fid": 4.0}}, "e", "k")
    assert (directory / "notes.txt").read_text() == "mine"
    assert json.loads((directory / "c1.json").read_text()) == {"fid": 3.0}


@pytest.mark.skipif(shutil.which("dvc") is None, reason="needs the dvc command")
def test_dvc_metrics_show_of_the_default_layout_fits_120_columns(tmp_path):
    """The files at their default paths, declared as dvc.yaml declares them, shown by DVC."""
    defaults = Params()
    write_json(tmp_path / defaults.featurenet.metrics_file, featurenet_metrics(FEATURENET))
    write_json(tmp_path / defaults.train.out_dir / TRAIN_METRICS, train_metrics(SINGLE_RUN))
    evaluated = evaluation_metrics(report("gan-dcgan-a8897ee1c9d3"))
    write_metrics_dir(tmp_path / defaults.evaluate.metrics_dir, evaluated, "evaluate", "k")
    declared = [
        defaults.featurenet.metrics_file,
        f"{defaults.train.out_dir}/{TRAIN_METRICS}",
        defaults.evaluate.metrics_dir,
    ]
    (tmp_path / "dvc.yaml").write_text(json.dumps({"metrics": declared}))
    dvc = ["dvc", "--cd", str(tmp_path)]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], check=True)
    shown = subprocess.run([*dvc, "metrics", "show"], check=True, capture_output=True, text=True)
    lines = shown.stdout.splitlines()
    assert len(lines) == 5, shown.stdout  # the header, featurenet, train, c1, real
    assert max(map(len, lines)) <= 120, shown.stdout
    for expected in ("fid", "precision", "coverage", "accuracy", "images/s", "seconds"):
        assert expected in lines[0].split(), lines[0]
    assert "metrics/evaluate/c1.json" in shown.stdout and HASH[:8] not in shown.stdout
