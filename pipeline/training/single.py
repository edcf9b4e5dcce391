"""The driver of a single training run: one Ray Train DDP run, checkpointed, resumable,
tracked as one MLflow run."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from pipeline.artifacts import HISTORY, candidate_record
from pipeline.cluster import is_remote
from pipeline.config import Params
from pipeline.training.checkpoints import read_history
from pipeline.training.identity import run_identity, run_name
from pipeline.training.outputs import write_train_outputs
from pipeline.training.progress import RunProgress
from pipeline.training.run import (
    Setup,
    connect_and_tidy,
    fit,
    open_mlflow_run,
    prepare_training,
    resumable_checkpoint,
    tracked_run,
)
from pipeline.training.tracker import DIVERGED_REASON_TAG, DIVERGED_TAG, PROGRESS_TAG, RunRef
from pipeline.training.worker_config import WorkerConfig


def train_single(params: Params) -> dict:
    """Run (or resume) one training run; write result.json, the final checkpoint, the history."""
    from pipeline.tracking import RESUMED_FROM_TAG, reopen_run

    setup = prepare_training(params)
    identity = run_identity(params, setup.dataset_hash)
    name = run_name(params, setup.dataset_hash)
    found = resumable_checkpoint(setup.storage, name, identity, params.train.steps)
    client = setup.client
    run_id, finished = _choose_mlflow_run(setup, name, found)
    if finished and found.state["step"] == params.train.steps:  # nothing left to train
        return _outputs_of_finished_run(setup, name, found, finished)
    connect_and_tidy(setup)
    if run_id is None:
        resumed = {RESUMED_FROM_TAG: finished, "ganpipe.resumed_from_step": str(
            found.state["step"])} if finished else {}  # fmt: skip
        run_id = open_mlflow_run(client, params, name, setup.dataset_hash, resumed)
    else:
        reopen_run(client, run_id, clear_tags=(DIVERGED_TAG, DIVERGED_REASON_TAG, PROGRESS_TAG))

    config = WorkerConfig.build(params, setup.dataset_hash, RunRef(setup.tracking_uri, run_id))
    with tracked_run(client, run_id, "training") as run:
        with RunProgress(client, run_id, f"train {name}"):
            result = fit(params, name, setup.storage, config)
        diverged_at = client.get_run(run_id).data.tags.get(DIVERGED_TAG)
        reached = int(result.metrics.get("step", 0)) if result.metrics else 0
        if diverged_at is None and reached < params.train.steps:  # aborted gracefully
            raise KeyboardInterrupt(f"training interrupted; last checkpoint at step {reached}")
        diverged = diverged_at is not None
        summary = _summary(setup, name, run_id, result.checkpoint, result.metrics, diverged)
        summary["diverged_at_step"] = int(diverged_at) if diverged else None
        _write(setup, summary, result.checkpoint)
        run.status = "FAILED" if diverged else "FINISHED"
    return summary


def _choose_mlflow_run(setup: Setup, name: str, found) -> tuple[str | None, str | None]:
    """The MLflow run this attempt continues (None: a new one), and the FINISHED run whose
    checkpoint it resumes, if that is what it does.

    The run that wrote the checkpoint being resumed is continued while it is unfinished. A
    FINISHED one is never reopened: its checkpoint trained on makes a new run that names it;
    without a checkpoint (runs/ deleted) training starts over as a new run."""
    from pipeline.tracking import RUN_NAME_TAG, experiment_id, unfinished_run

    client = setup.client
    experiment = experiment_id(client, setup.params.tracking.experiment)
    by_name = f"tags.`{RUN_NAME_TAG}` = '{name}'"
    if found is None:
        if is_remote(setup.storage):  # the driver does not read remote checkpoints
            run = unfinished_run(client, experiment, by_name)
            return (run.info.run_id if run else None), None
        return None, None
    run = None
    if found.state.get("mlflow_run_id"):
        with contextlib.suppress(Exception):  # deleted from the store: a new run
            run = client.get_run(found.state["mlflow_run_id"])
    elif "mlflow_run_id" not in found.state:  # written before checkpoints named their run
        run = unfinished_run(client, experiment, by_name)
    if run is None:
        return None, None
    if run.info.status == "FINISHED":
        return None, run.info.run_id
    return run.info.run_id, None


def _summary(setup: Setup, name: str, run_id: str, checkpoint, metrics, diverged: bool) -> dict:
    """result.json of a single run whose last checkpoint is `checkpoint` (a Ray Checkpoint or
    None), reported with `metrics`."""
    reached = int(metrics.get("step", 0)) if metrics else 0
    return {
        "run_name": name,
        "mlflow_run_id": run_id,
        "dataset_hash": setup.dataset_hash,
        "diverged": diverged,
        "diverged_at_step": None,
        "checkpoint": checkpoint.path if checkpoint else None,
        "steps": reached,  # of the last checkpoint (Ray's Result.metrics come from it)
        "global_batch_size": setup.params.global_batch_size,
        "candidates": [candidate_record(name, run_id, reached, diverged)] if checkpoint else [],
        "final_metrics": {
            k: v
            for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
    }


def _write(setup: Setup, summary: dict, checkpoint) -> None:
    """The outputs of a single run: its params are its best params."""
    tree = setup.params.model_dump(mode="json", exclude={"sweep"})
    local = [checkpoint.as_directory] if checkpoint else []
    write_train_outputs(Path(setup.params.train.out_dir), summary, local, tree)


def _outputs_of_finished_run(setup: Setup, name: str, found, run_id: str) -> dict:
    """The outputs of a run whose FINISHED MLflow run already trained every step (train.out_dir
    deleted, or `dvc repro -f`): written again from its checkpoint without Ray, and the run,
    the provenance of what was registered from it, left exactly as it is."""
    from ray.train import Checkpoint

    history = read_history(found.path / HISTORY)
    metrics = history[-1] if history else {"step": found.state["step"]}
    checkpoint = Checkpoint.from_directory(str(found.path))
    summary = _summary(setup, name, run_id, checkpoint, metrics, diverged=False)
    _write(setup, summary, checkpoint)
    print(
        f"train: {name} was already trained to step {found.state['step']} by MLflow run "
        f"{run_id} (FINISHED); outputs written again from {found.path}",
        file=sys.stderr,
    )
    return summary
