"""The run plumbing both drivers (a single run, a sweep) share: the checks before Ray
starts, resuming, the MLflow run's life, signals and the fit."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass

from gan.tasks import task_for
from pipeline.cluster import (
    close_runs_if_killed,
    connect,
    is_remote,
    storage_root,
    use_gpu,
)
from pipeline.config import Params, flatten
from pipeline.config.growth import batch_at, resolutions
from pipeline.console import library_log_level
from pipeline.data import check_data_for_task, check_split_fits_batch
from pipeline.recipes import recipe_for
from pipeline.shards import verify_prepared
from pipeline.training.identity import ResumeMismatchError, check_same_run
from pipeline.training.loop import train_worker
from pipeline.training.outputs import check_train_outputs
from pipeline.training.worker_config import WorkerConfig


@dataclass(frozen=True)
class Setup:
    """What both drivers establish before any work: verified data, storage, tracking."""

    params: Params
    manifest: dict
    storage: str  # where Ray keeps the runs' checkpoints
    tracking_uri: str
    client: object  # MlflowClient

    @property
    def dataset_hash(self) -> str:
        return self.manifest["dataset_hash"]


def prepare_training(params: Params) -> Setup:
    """Refuse, before Ray starts, what would fail later: outputs ganpipe did not write, data
    that is damaged, unlabeled for a conditional model or smaller than a batch per worker, a
    tracking server that cannot be reached."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_reachable, tracking_uri

    check_train_outputs(params)
    manifest = verify_prepared(params.prepare.out_dir, ["train"])
    check_data_for_task(manifest, task_for(params.model.conditional))
    largest = max(batch_at(params, r) for r in resolutions(params))  # progan: per resolution
    check_split_fits_batch(manifest, largest, params.ray.num_workers)
    uri = tracking_uri(params)
    check_reachable(uri)
    return Setup(params, manifest, storage_root(params), uri, MlflowClient(uri))


def connect_and_tidy(setup: Setup) -> str:
    """Join the Ray cluster (before any MLflow run is opened: a cluster that cannot be joined
    leaves no trace) and close the runs of drivers that are gone; the experiment's id."""
    from pipeline.tracking import close_abandoned_runs, experiment_id

    connect(setup.params)
    experiment = experiment_id(setup.client, setup.params.tracking.experiment)
    close_abandoned_runs(setup.client, experiment)
    close_runs_if_killed(setup.tracking_uri, experiment)
    return experiment


def resumable_checkpoint(storage: str, name: str, identity: dict, steps: int):
    """Before starting Ray: the checkpoint a local run of this name resumes from (the newest
    intact one: a damaged newer one is named and skipped, as the workers skip it), which must
    have been trained like this one and not past `steps`; None when there is none (or the
    storage is remote: the workers check what they restore)."""
    from pathlib import Path

    from pipeline.checkpoint import newest_intact

    if is_remote(storage):
        return None
    run_dir = Path(storage, name)
    found = newest_intact(
        sorted((d for d in run_dir.glob("checkpoint_*") if d.is_dir()), reverse=True)
    )
    if found is None:
        return None
    for problem in found.damaged:
        print(f"train: skipping a damaged checkpoint: {problem}", file=sys.stderr, flush=True)
    if found.damaged:
        print(f"train: resuming from {found.path} (step {found.state['step']})", file=sys.stderr)
    check_same_run(found.state["params"], identity)
    if found.state["step"] > steps:
        raise ResumeMismatchError(
            f"train.steps is {steps}, but this run's checkpoint {found.path} is at step "
            f"{found.state['step']}: a run cannot be trained back. Set train.steps to "
            f"{found.state['step']} or more to use (or continue) it, or delete {run_dir} to "
            f"train a new {steps}-step run from step 0"
        )
    return found


def open_mlflow_run(
    client, params: Params, name: str, dataset_hash: str, extra_tags: dict | None = None
) -> str:
    """A new MLflow run for training run `name`, with its params and identifying tags
    (`extra_tags`: e.g. the parent run of a sweep, or the run it continues)."""
    from mlflow.entities import Param

    from pipeline.tracking import DRIVER_TAG, RUN_NAME_TAG, driver_id, experiment_id, git_commit

    tags = {
        RUN_NAME_TAG: name,
        "ganpipe.recipe": recipe_for(params.prepare.resolution, params.model.family).name,
        "ganpipe.task": task_for(params.model.conditional).name,
        "ganpipe.dataset_hash": dataset_hash,
        "ganpipe.git_commit": git_commit(),
        DRIVER_TAG: driver_id(),
        **(extra_tags or {}),
    }
    experiment = experiment_id(client, params.tracking.experiment)
    run = client.create_run(experiment, run_name=name, tags=tags)
    flat = {k: str(v) for k, v in flatten(params.model_dump(mode="json")).items()}
    flat["train.global_batch_size"] = str(params.global_batch_size)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(flat.items())])
    return run.info.run_id


class TrackedRun:
    """The MLflow run a driver holds open; `status` is how it ends if the body returns."""

    def __init__(self, run_id: str):
        self.run_id, self.status = run_id, "FINISHED"


@contextlib.contextmanager
def tracked_run(client, run_id: str, what: str):
    """Hold MLflow run `run_id` open while the body trains: it ends KILLED when interrupted
    (SIGINT, or SIGTERM turned into one), FAILED on an error, else with the body's status."""
    run = TrackedRun(run_id)
    try:
        with graceful_signals():
            yield run
    except (KeyboardInterrupt, SystemExit) as exc:  # Ray exits from its handler if aborts race
        client.set_terminated(run_id, status="KILLED")
        message = str(exc) if isinstance(exc, KeyboardInterrupt) and str(exc) else ""
        raise KeyboardInterrupt(message or f"{what} interrupted") from None
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status=run.status)


@contextlib.contextmanager
def graceful_signals():
    """Ray's fit() (Train and Tune) turns SIGINT into a graceful abort and leaves its handler
    installed: put ours back after. SIGTERM is re-sent as SIGINT so it aborts the same way."""
    if threading.current_thread() is not threading.main_thread():  # signals live there
        yield
        return
    sigint = signal.getsignal(signal.SIGINT)
    sigterm = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)


def fit(params: Params, name: str, storage: str, config: WorkerConfig, callbacks=()):
    """Run the TorchTrainer of run `name` on the connected Ray; Ray's Result. `callbacks` are
    Ray Train callbacks (a sweep trial forwards the reports to Tune with one)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"worker": config},
        scaling_config=ScalingConfig(
            num_workers=params.ray.num_workers,
            use_gpu=use_gpu(params),
            resources_per_worker={"CPU": params.ray.cpus_per_worker},
            placement_strategy=params.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=params.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level=library_log_level()),  # no report dumps
        ),
    )
    return trainer.fit()
