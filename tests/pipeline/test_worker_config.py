"""What a driver hands every worker: one typed object, built in one place, checked at entry;
fault drills reach it from the environment, never through the stage's signature."""

import dataclasses
import inspect
import os

import pytest

from pipeline.config import validate_params
from pipeline.train import train
from pipeline.training.faults import FAULT_PLAN_ENV, FaultPlan, drill, planned_faults
from pipeline.training.tracker import RunRef
from pipeline.training.worker_config import TrialScoring, WorkerConfig


def params(tmp_path):
    return validate_params({"prepare": {"out_dir": str(tmp_path / "prepared")}})


def test_build_makes_paths_absolute_and_names_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = validate_params({"prepare": {"out_dir": "data/prepared"}})
    config = WorkerConfig.build(relative, "hash1", RunRef("sqlite:///m.db", "run1"))
    assert config.params.prepare.out_dir == str(tmp_path / "data" / "prepared")
    assert config.identity["dataset"] == "hash1" and config.run.run_id == "run1"
    assert config.faults is None and config.scoring is None and not config.pbt
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pbt = True


def test_a_hand_built_config_fails_at_the_worker_s_entry_not_mid_run(tmp_path):
    good = WorkerConfig.build(params(tmp_path), "hash1")
    with pytest.raises(TypeError, match="WorkerConfig.params is a dict"):
        dataclasses.replace(good, params=good.params.model_dump()).check()
    with pytest.raises(ValueError, match="a PBT trial needs its scoring"):
        dataclasses.replace(good, pbt=True).check()
    with pytest.raises(FileNotFoundError, match="has no prepared data at .*prepared: every node"):
        good.check()  # nothing prepared at the path
    (tmp_path / "prepared").mkdir()
    good.check()
    scoring = TrialScoring(100, str(tmp_path / "prepared"), "f", "c", 0, "hash1")
    dataclasses.replace(good, scoring=scoring, pbt=True).check()


def test_fault_drills_reach_the_workers_from_the_environment_only(tmp_path, monkeypatch):
    assert "faults" not in inspect.signature(train).parameters
    monkeypatch.delenv(FAULT_PLAN_ENV, raising=False)
    with drill(FaultPlan(nan_at_step=6)):
        assert WorkerConfig.build(params(tmp_path), "h").faults == FaultPlan(nan_at_step=6)
    assert planned_faults() is None and FAULT_PLAN_ENV not in os.environ
    monkeypatch.setenv(FAULT_PLAN_ENV, "{not json")
    with pytest.raises(ValueError, match="GANPIPE_FAULT_PLAN is not a fault plan"):
        planned_faults()
    with pytest.raises(ValueError, match="needs exit_rank, exit_at_step and marker"):
        FaultPlan(exit_at_step=3)
