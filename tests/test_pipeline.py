"""End to end: `dvc repro` runs prepare -> featurenet -> train -> evaluate -> register on
digits in a fresh git repository, with local Ray and a sqlite MLflow; then the DVC metrics
commands, the registry and the sample command work on what it produced."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("git") is None, reason="DVC needs git"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with its shipped params.yaml (the Quickstart: DCGAN on 16x16
    digits, 1000 steps, 2 Ray workers; about 3 minutes on 2 CPUs), after one `dvc repro`
    and a git commit."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, root / name)
    for package in ("pipeline", "gan"):
        shutil.copytree(
            REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(*cmd, check=True):
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if check and result.returncode:
            raise AssertionError(f"{cmd} failed:\n{result.stdout}\n{result.stderr}")
        return result

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    first = sh(sys.executable, "-m", "dvc", "repro")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "first run")
    return root, sh, first


def test_repro_runs_every_stage_in_order(project):
    _, _, first = project
    order = [
        line.split("'")[1] for line in first.stdout.splitlines() if line.startswith("Running stage")
    ]
    assert order == ["prepare", "featurenet", "train", "evaluate", "register"]


def test_metrics_show_the_figures_and_the_trained_generator_is_near_real_digits(project):
    root, sh, _ = project
    shown = json.loads(sh(sys.executable, "-m", "dvc", "metrics", "show", "--json").stdout)
    figures = shown[""]["data"]["metrics/evaluate.json"]["data"]
    (candidate,) = figures["candidates"].values()
    floor, ceiling = figures["sanity"]["fid_floor_domain"], candidate["fid_ceiling_domain"]
    assert floor < candidate["fid_domain"] < 0.25 * ceiling  # measured: 1.4 < 36 < 379 / 4
    assert candidate["class_coverage_domain"] >= 0.8  # no collapse onto a few digits
    featurenet = shown[""]["data"]["metrics/featurenet.json"]["data"]
    assert featurenet["test_accuracy"] >= 0.95


def test_registered_champion_samples_to_a_png_grid(project):
    root, sh, _ = project
    registered = json.loads((root / "models" / "register" / "registered.json").read_text())
    assert registered["version"] in (1, "1") and "champion" in registered["aliases"]
    sh("ganpipe", "sample", "--num", "16", "--nrow", "4", "--seed", "1", "--out", "grid.png")
    with Image.open(root / "grid.png") as grid:
        assert grid.size == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2)


def test_a_second_repro_is_a_no_op_and_a_protocol_change_reruns_only_evaluation(project):
    root, sh, _ = project
    again = sh(sys.executable, "-m", "dvc", "repro")
    assert "Running stage" not in again.stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["num_samples"] = 1500
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh(sys.executable, "-m", "dvc", "repro")
    ran = {line.split("'")[1] for line in changed.stdout.splitlines() if "Running stage" in line}
    assert ran <= {"evaluate", "register"}
    diff = json.loads(sh(sys.executable, "-m", "dvc", "metrics", "diff", "--json").stdout)
    changes = diff["metrics/evaluate.json"]
    assert changes["protocol.num_samples"] == {"old": 2000, "new": 1500, "diff": -500}
    assert any(k.endswith(".fid_domain") for k in changes)
    registered = json.loads((root / "models" / "register" / "registered.json").read_text())
    assert registered["version"] in (1, "1"), "the same weights registered again"


def test_a_sweep_through_dvc_repro_hands_its_best_trials_to_evaluate_and_register(project):
    root, sh, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["steps"] = 300
    params["ray"]["num_workers"] = 1
    params["sweep"] = {
        "space": {"train.lr_g": {"type": "grid", "values": [1e-4, 2e-4, 4e-4, 8e-4]}},
        "num_trials": 1, "top_k": 2, "scheduler": "asha", "eval_every": 100,
        "eval_samples": 500,
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    swept = sh(sys.executable, "-m", "dvc", "repro")
    ran = [line.split("'")[1] for line in swept.stdout.splitlines() if "Running stage" in line]
    assert ran == ["train", "evaluate", "register"]
    result = json.loads((root / "models" / "train" / "result.json").read_text())
    assert len(result["trials"]) == 4 and len(result["candidates"]) == 2
    assert all(t["stop_reason"] in ("completed", "early_stopped", "fid_worsening")
               for t in result["trials"])  # fmt: skip
    assert (root / "models" / "train" / "best_params.yaml").is_file()
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert set(evaluated["candidates"]) == {c["name"] for c in result["candidates"]}
    registered = json.loads((root / "models" / "register" / "registered.json").read_text())
    assert registered["candidate"] in evaluated["candidates"]
    assert "challenger" in registered["aliases"]
