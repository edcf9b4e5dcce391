"""End to end with a sweep: in a fresh clone, params.yaml asks for a Ray Tune sweep and one
`dvc repro` prepares the data, trains the featurenet, runs the sweep, evaluates its best trials
and registers the best of them. A module of its own, so that it runs beside tests/test_pipeline.py
on the other pytest worker."""

import json
import shutil

import pytest
import yaml

from tests.conftest import clone_project, project_env, shell, stages_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(shutil.which("git") is None, reason="DVC needs git"),
]


def test_a_sweep_through_dvc_repro_hands_its_best_trials_to_evaluate_and_register(tmp_path):
    root = clone_project(tmp_path / "ganpipe")
    sh = shell(root, project_env(root))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["steps"] = 200
    params["ray"]["num_workers"] = 1
    params["sweep"] = {
        "space": {"train.lr_g": {"type": "grid", "values": [1e-4, 2e-4, 4e-4, 8e-4]}},
        "num_trials": 1, "top_k": 2, "scheduler": "asha", "eval_every": 100,
        "eval_samples": 500,
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    swept = sh("dvc", "repro")
    assert stages_run(swept.stdout) == ["prepare", "featurenet", "train", "evaluate", "register"]
    result = json.loads((root / "models" / "train" / "result.json").read_text())
    assert len(result["trials"]) == 4 and len(result["candidates"]) == 2
    assert all(t["stop_reason"] in ("completed", "early_stopped", "fid_worsening")
               for t in result["trials"])  # fmt: skip
    assert (root / "models" / "train" / "best_params.yaml").is_file()
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert set(evaluated["candidates"]) == {c["name"] for c in result["candidates"]}
    registered = json.loads((root / "models" / "register" / "registered.json").read_text())
    assert registered["candidate"] in evaluated["candidates"]
    assert {"champion", "challenger"} <= set(registered["aliases"])
    assert "Data and pipelines are up to date" in sh("dvc", "status").stdout
