import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline.cli import EXIT_BAD_PARAMS, main
from tests.conftest import REPO_ROOT


def ganpipe(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True
    )


def test_validate_prints_the_full_configuration_with_overrides(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("train:\n  lr_g: 0.001\n")
    code = main(
        ["validate", "--params", str(tmp_path / "params.yaml"), "--set", "model.family=mlp"]
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert resolved["train"]["lr_g"] == 0.001
    assert resolved["model"]["family"] == "mlp"
    assert resolved["evaluate"]["kid_subset_size"] == 1000  # defaults filled in


def test_bad_params_exit_2_with_the_reason_and_write_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lerning_rate: 0.001\n")
    before = sorted(os.listdir(tmp_path))
    result = ganpipe("validate", "--out", "resolved.yaml", cwd=tmp_path)
    assert result.returncode == EXIT_BAD_PARAMS
    assert "train.lerning_rate: unknown key" in result.stderr
    assert "did you mean 'lr_g' or 'lr_d'" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_override_exits_2(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    result = ganpipe("validate", "--set", "train.steps=-5", cwd=tmp_path)
    assert result.returncode == EXIT_BAD_PARAMS
    assert "train.steps: Input should be greater than or equal to 1 (got -5)" in result.stderr


def test_toy_command_reports_coverage(capsys):
    assert main(["toy", "--steps", "20", "--eval-samples", "200", "--no-spectral-norm"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["steps"] == 20
    assert report["coverage"]["num_modes"] == 8
    assert set(report["last_step"]) >= {"loss_d", "loss_g"}


def test_toy_command_rejects_unknown_choices(tmp_path):
    result = ganpipe("toy", "--loss", "minimax", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'minimax'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="DVC experiments need git")
def test_dvc_exp_run_set_param_reaches_the_validated_config(tmp_path):
    """`dvc exp run -S` edits params.yaml; the stage sees the new value, a typo fails loudly."""
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env = {**os.environ, **identity, "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]

    def sh(*cmd, check=True):
        return subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=check
        )

    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  resolve:\n"
        f"    cmd: {sys.executable} -m pipeline validate --out resolved.yaml\n"
        "    params: [train]\n    outs: [resolved.yaml]\n"
    )
    (tmp_path / ".gitignore").write_text("/resolved.yaml\n")
    sh("git", "init", "-q")
    sh(*dvc, "init", "-q")
    sh(*dvc, "config", "core.analytics", "false")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    sh(*dvc, "exp", "run", "-S", "train.lr_g=1e-4")
    resolved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert resolved["train"]["lr_g"] == pytest.approx(1e-4)
    refused = sh(*dvc, "exp", "run", "-S", "train.lerning_rate=1e-4", check=False)
    assert refused.returncode != 0 and "lerning_rate" in refused.stderr  # DVC's own check
    appended = sh(*dvc, "exp", "run", "-S", "+train.lerning_rate=1e-4", check=False)  # forced
    assert appended.returncode != 0
    assert "did you mean 'lr_g' or 'lr_d'" in appended.stdout + appended.stderr


# --- issue 13: bad paths and arguments are one-line messages with exit 2, never a traceback.


def test_bad_params_paths_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  loss: \xe9\n")
    assert main(["validate", "--params", str(tmp_path / "latin1.yaml")]) == EXIT_BAD_PARAMS
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["validate", "--params", str(tmp_path)]) == EXIT_BAD_PARAMS
    assert "is a directory" in capsys.readouterr().err


def test_validate_out_into_a_missing_directory_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("")
    out = tmp_path / "missing" / "resolved.yaml"
    code = main(["validate", "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert code == EXIT_BAD_PARAMS
    err = capsys.readouterr().err
    assert "--out" in err and "does not exist" in err and str(out.parent) in err
    assert not out.parent.exists()
    code = main(["validate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path)])
    assert code == EXIT_BAD_PARAMS and "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nrow", "0"], "--nrow: expected a positive integer, got 0"),
        (["--num", "-3"], "--num: expected a positive integer, got -3"),
        (["--out", "."], "is a directory"),
        (["--truncation", "1.5"], "--truncation: truncation must be from 0 to 1 (psi: 1 changes"),
    ],
)
def test_sample_arguments_are_checked_before_any_model_is_loaded(tmp_path, args, message):
    (tmp_path / "params.yaml").write_text("")
    result = ganpipe("sample", "--model", str(tmp_path / "no-model"), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ganpipe sample:")  # usage, then the message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "walk.jpg"], "--out walk.jpg: expected a .png (a grid) or a .gif (an anima"),
        (["--out", "w.gif", "--steps", "1"], "--steps: expected at least 2 frames (both ends)"),
        (["--out", "w.gif", "--method", "cubic"], "--method: invalid choice: 'cubic'"),
        (["--out", "w.gif", "--truncation", "-1"], "--truncation: truncation must be from 0 to"),
        (["--to-seed", "2"], "the following arguments are required: --from-seed, --out"),
    ],
)
def test_interpolate_arguments_are_checked_before_any_model_is_loaded(tmp_path, args, message):
    (tmp_path / "params.yaml").write_text("")
    seeds = [] if "--to-seed" in args else ["--from-seed", "1", "--to-seed", "2"]
    result = ganpipe(
        "interpolate", "--model", str(tmp_path / "no-model"), *seeds, *args, cwd=tmp_path
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ganpipe interpolate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_huge_error_message_is_capped_by_the_cli(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("train:\n  typo: " + "x" * 1_000_000 + "\n")
    assert main(["validate", "--params", str(tmp_path / "params.yaml")]) == EXIT_BAD_PARAMS
    err = capsys.readouterr().err
    assert "train.typo: unknown key" in err and len(err) < 2_000
