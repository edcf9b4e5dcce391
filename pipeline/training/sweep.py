"""The train stage as a Ray Tune sweep, when params.yaml has a `sweep.space`.

Every trial is a full Ray Train DDP run (pipeline.training.run.fit), started from a Tune function
trainable whose TorchTrainer forwards its reports to Tune (TuneReportCallback: Train V2 runs
cannot be Tune trainables themselves). Trials report every `sweep.eval_every` steps with the
domain FID/KID of `sweep.eval_samples` EMA samples (pipeline.scoring.TrialEvaluator), so the
scheduler (ASHA, or FIFO) and the instability stopper act on image quality:

- diverged:      a non-finite loss or gradient (gan.step skips it and every later update;
                 every rank reports the first bad step at the next report)
- d_collapse:    D(x) > 1 - margin and D(G(z)) < margin for `patience` evaluations in a row
- mode_collapse: the share of classes the featurenet finds in the samples fell below
                 `min_class_coverage` for `patience` evaluations in a row (labeled data only)
- fid_worsening: no FID improvement for `patience` evaluations
- early_stopped: ASHA ended it for being behind its rung; completed: it ran every step

Trials are named like single runs plus their Tune trial id (gan-<family>-<hash>-<trial>), so an
interrupted sweep resumed with the same params (`Tuner.restore`) continues its unfinished trials
from their own checkpoints and does not re-run finished ones. MLflow: one parent run per sweep
and a child run per trial. Outputs in `train.out_dir`: result.json (per-trial table, stability
table, the best `sweep.top_k` trials as candidates for the evaluate stage), candidates/,
best_params.yaml (params.yaml with the best trial's values), and the best trial's history and
sample grid.

Progressive growing (model.family progan): every trial is scored at the final resolution at
every evaluation, its samples upsampled from the stage it is at (pipeline.training.growth.
AtFinalSize), so ASHA compares all trials on one FID at equal images shown and a trial that
grows later pays for its blur; a trial whose last checkpoint was taken before it had grown to
the final resolution (stopped early) is never a candidate: there is nothing to export yet.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path

from pipeline.artifacts import candidate_record
from pipeline.cluster import join, local_checkpoint, read_json, save_json, use_gpu
from pipeline.config import Choice, Grid, Params, Uniform
from pipeline.console import verbose
from pipeline.errors import SweepError
from pipeline.scoring import TrialEvaluator
from pipeline.training.identity import run_name
from pipeline.training.loop import train_loop
from pipeline.training.outputs import write_train_outputs
from pipeline.training.run import (
    Setup,
    connect_and_tidy,
    fit,
    open_mlflow_run,
    prepare_training,
    tracked_run,
)
from pipeline.training.sessions import TuneSession
from pipeline.training.tracker import DIVERGED_REASON_TAG, DIVERGED_TAG, RunRef
from pipeline.training.worker_config import TrialScoring, WorkerConfig

STOP_REASONS = "stop_reasons.json"
SWEEP_TAG = "ganpipe.sweep_name"  # on the trials' runs
PARENT_TAG = "ganpipe.sweep"  # on the sweep's parent run
STOP_TAG = "ganpipe.stop_reason"
TRIAL_MEMORY = 64 * 1024**2  # the trial driver only waits on its TorchTrainer


def trial_params(base: dict, sampled: dict, eval_every: int) -> Params:
    """The params of one trial: the base with the sampled values, reporting (and
    checkpointing) at every evaluation, and no sweep of its own."""
    tree = copy.deepcopy(base)
    for key, value in sampled.items():
        section, field = key.split(".", 1)
        tree[section][field] = value
    tree["sweep"] = {}
    tree["train"]["log_every"] = tree["train"]["checkpoint_every"] = eval_every
    return Params.model_validate(tree)


def tune_space(space: dict) -> dict:
    """sweep.space as a Ray Tune search space."""
    from ray import tune

    converted = {}
    for key, dim in space.items():
        if isinstance(dim, Grid):
            converted[key] = tune.grid_search(list(dim.values))
        elif isinstance(dim, Choice):
            converted[key] = tune.choice(list(dim.values))
        elif isinstance(dim, Uniform):
            sample = tune.loguniform if dim.type == "loguniform" else tune.uniform
            converted[key] = sample(dim.low, dim.high)
    return converted


def sweep_name(params: Params, dataset_hash: str) -> str:
    """Named after the base configuration, the search and the data: the same sweep resumes."""
    what = params.model_dump(mode="json", exclude={"evaluate", "register", "tracking"})
    what["dataset"] = dataset_hash
    return f"sweep-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"


class InstabilityStopper:
    """A Tune stopper that ends unstable trials and remembers why (in a JSON file that
    survives an interrupted sweep)."""

    def __init__(self, path: str, patience: int, margin: float, min_coverage: float):
        from ray import tune

        self.path, self.patience, self.margin = path, patience, margin
        self.min_coverage = min_coverage
        self.reasons: dict[str, str] = read_json(path) or {}
        self.history: dict[str, list[dict]] = defaultdict(list)
        self.stopper = tune.stopper.FunctionStopper(self)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if "fid_domain" not in result:
            return False
        history = self.history[trial_id]
        step = result.get("step")
        if history and step is not None and history[-1].get("step") == step:
            history.pop()  # Tune repeats a trial's last result when it ends
        history.append(result)
        reason = self._reason(history)
        if reason:
            self.reasons[trial_id] = reason
            save_json(self.path, self.reasons)
        return reason is not None

    def _reason(self, history: list[dict]) -> str | None:
        last, k = history[-1], self.patience
        if last.get("diverged"):
            return "diverged"
        recent = history[-k:]
        if len(recent) == k:
            if all(
                r.get("d_real", 0.5) > 1 - self.margin and r.get("d_fake", 0.5) < self.margin
                for r in recent
            ):
                return "d_collapse"
            coverage = [r.get("class_coverage_domain") for r in history]
            reached = any(c is not None and c >= self.min_coverage for c in coverage[:-k])
            if reached and all(c is not None and c < self.min_coverage for c in coverage[-k:]):
                return "mode_collapse"  # fell: an untrained generator covers few classes too
        fids = [r["fid_domain"] for r in history]
        best = fids.index(min(fids))
        if len(fids) - 1 - best >= k:
            return "fid_worsening"
        return None


def _check_stoppable(params: Params) -> None:
    """A Train-in-Tune trial that Tune stops early (ASHA, the stopper) releases its workers
    only when Ray runs its dashboard (ray[default]); without it the next trials wait forever
    for CPUs (seen with Ray 2.60). Refuse that instead of hanging."""
    from ray._private.worker import get_dashboard_url

    if params.sweep.scheduler != "pbt" and not get_dashboard_url():
        raise SweepError(
            "this Ray cluster runs without its dashboard, so trials stopped early would keep "
            "their CPUs and the sweep would hang; start Ray with the dashboard (install "
            "ray[default]; do not pass include_dashboard=False / --include-dashboard=false)"
        )


def _trial_resources(params: Params) -> dict:
    """A Train-in-Tune trial's driver only waits on its TorchTrainer (whose workers ask for
    the CPUs); a PBT trial trains in its own process and needs a worker's share."""
    if params.sweep.scheduler != "pbt":
        return {"memory": TRIAL_MEMORY}
    return {"cpu": params.ray.cpus_per_worker, "gpu": 1 if use_gpu(params) else 0}


def _concurrency(params: Params) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) fit, at most max_concurrent."""
    import ray

    resources = ray.cluster_resources()
    per_trial = params.ray.num_workers * params.ray.cpus_per_worker
    fit = int(resources.get("CPU", 0) // per_trial)
    if fit < 1:
        raise SweepError(
            f"a trial needs {per_trial:g} CPUs (ray.num_workers {params.ray.num_workers} x "
            f"ray.cpus_per_worker {params.ray.cpus_per_worker}) but the cluster has "
            f"{resources.get('CPU', 0):g}; lower them or add nodes"
        )
    if use_gpu(params):
        fit = min(fit, int(resources.get("GPU", 0) // params.ray.num_workers))
        if fit < 1:
            raise SweepError(
                f"a trial needs {params.ray.num_workers} GPUs (one per worker, ray.num_workers) "
                f"but the cluster has {resources.get('GPU', 0):g}; lower ray.num_workers, add "
                "GPU nodes, or set ray.use_gpu: false"
            )
    return min(fit, params.sweep.max_concurrent or fit)


def _scheduler(params: Params):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = params.sweep
    if s.scheduler == "asha":
        return ASHAScheduler(
            time_attr="step", max_t=params.train.steps,
            grace_period=s.grace_period or s.eval_every, reduction_factor=s.reduction_factor,
        )  # fmt: skip
    if s.scheduler == "fifo":
        return FIFOScheduler()
    space = tune_space({k: d for k, d in s.space.items() if not isinstance(d, Grid)})
    return PopulationBasedTraining(
        time_attr="step", perturbation_interval=s.eval_every, hyperparam_mutations=space,
    )  # fmt: skip


def _search(params: Params, concurrency: int):
    """The searcher, seeded with train.seed (the same params draw the same trials), starting
    at most `concurrency` trials at once (Tune ignores max_concurrent_trials for a searcher
    it did not make)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if params.sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=params.train.seed), concurrency)
    return BasicVariantGenerator(random_state=params.train.seed, max_concurrent=concurrency)


def run_trial(config: dict, context: dict) -> None:
    """One trial (a Tune function trainable): a Ray Train run of the sampled configuration,
    tracked as a child of the sweep's MLflow run. Under PBT the trial is the training loop
    itself, in this process (Ray's PBT cannot exploit Train runs)."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.tracking import RUN_NAME_TAG, experiment_id, reopen_run, unfinished_run

    params = trial_params(context["base"], config, context["eval_every"])
    dataset, trial_id = context["dataset_hash"], tune.get_context().get_trial_id()
    name = f"{run_name(params, dataset)}-{trial_id}"  # two trials may draw the same config
    client = MlflowClient(context["tracking_uri"])
    tags = {
        "mlflow.parentRunId": context["parent_run_id"],
        SWEEP_TAG: context["sweep_name"],
        "ganpipe.trial_id": trial_id,
    }
    experiment = experiment_id(client, params.tracking.experiment)
    previous = unfinished_run(client, experiment, f"tags.`{RUN_NAME_TAG}` = '{name}'")
    if previous is not None:  # Tune restored this trial: it continues its run
        run_id = previous.info.run_id
        reopen_run(client, run_id, clear_tags=(DIVERGED_TAG, DIVERGED_REASON_TAG))
    else:
        run_id = open_mlflow_run(client, params, name, dataset, tags)
    worker = WorkerConfig.build(
        params, dataset, RunRef(context["tracking_uri"], run_id), context["scoring"],
        pbt=context["pbt"],
    )  # fmt: skip
    if context["pbt"]:
        train_loop(worker, TuneSession())
    else:
        fit(params, name, context["storage"], worker, callbacks=[TuneReportCallback()])


def sweep(params: Params) -> dict:
    """Run (or resume) the sweep; write the outputs the evaluate stage reads."""
    from ray import tune

    from pipeline.tracking import git_commit
    from pipeline.training.progress import SweepProgress

    setup = prepare_training(params)
    dataset, storage, uri, client = (
        setup.dataset_hash, setup.storage, setup.tracking_uri, setup.client
    )  # fmt: skip
    name = sweep_name(params, dataset)
    scoring = TrialScoring.of(params, dataset)
    TrialEvaluator(scoring).fill_real_cache()  # and fails now, not in every trial
    experiment = connect_and_tidy(setup)
    _check_stoppable(params)
    path = join(storage, name)
    restoring = tune.Tuner.can_restore(path)
    parent = _parent_run(client, params, name, dataset, experiment, git_commit, restoring)

    context = {
        "base": params.model_dump(mode="json"),
        "eval_every": params.sweep.eval_every,
        "dataset_hash": dataset,
        "tracking_uri": uri,
        "parent_run_id": parent,
        "sweep_name": name,
        "storage": storage,
        "scoring": scoring,
        "pbt": params.sweep.scheduler == "pbt",
    }
    context["base"]["prepare"]["out_dir"] = scoring.prepared
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), _trial_resources(params)
    )
    s = params.sweep
    reasons_file = join(storage, f"{name}-{STOP_REASONS}")
    stopper = InstabilityStopper(reasons_file, s.patience, s.collapse_margin, s.min_class_coverage)
    with tracked_run(client, parent, "sweep"):
        if restoring:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space(s.space),
                tune_config=tune.TuneConfig(
                    metric="fid_domain",
                    mode="min",
                    num_samples=s.num_trials,
                    scheduler=_scheduler(params),
                    search_alg=_search(params, _concurrency(params)),
                ),  # fmt: skip
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    stop=stopper.stopper,
                    verbose=1 if verbose() else 0,
                    callbacks=[SweepProgress(f"sweep {name}", params.train.steps)],
                ),  # fmt: skip
            )
        grid = tuner.fit()
        if _unfinished(path, s.total_trials):  # on SIGINT Tune saves its state and returns
            raise KeyboardInterrupt(f"sweep interrupted; `dvc repro` resumes it from {path}")
        # A restored sweep stops with the stopper saved in its state: read what it wrote.
        reasons = read_json(reasons_file) or {}
        summary = _summarize(setup, grid, reasons, name, parent, experiment)
    return summary


def _unfinished(path: str, total_trials: int) -> bool:
    """Whether the saved experiment state is short of its end (the in-memory trials all read
    as terminated after an interrupt, since Tune stops them on the way out)."""
    from ray.tune import ExperimentAnalysis

    return sweep_unfinished([t.status for t in ExperimentAnalysis(path).trials], total_trials)


def sweep_unfinished(statuses: list[str], total_trials: int) -> bool:
    """A trial not ended, or one not started yet: an interrupt between two trials (the last
    one just ended, e.g. stopped by ASHA, and the searcher has not made the next) leaves
    only ended trials, and is still an interrupt."""
    ended = sum(status in ("TERMINATED", "ERROR") for status in statuses)
    return ended < max(len(statuses), total_trials)


def _parent_run(client, params, name, dataset, experiment, git_commit, restoring: bool) -> str:
    """The sweep's MLflow parent run: the earlier one when Tune restores the sweep and that run
    is unfinished; a FINISHED one is never reopened (a sweep whose storage was deleted runs
    again as a new run)."""
    from pipeline.tracking import DRIVER_TAG, driver_id, reopen_run, unfinished_run

    found = unfinished_run(client, experiment, f"tags.`{PARENT_TAG}` = '{name}'")
    if restoring and found is not None:
        reopen_run(client, found.info.run_id)
        return found.info.run_id
    tags = {
        PARENT_TAG: name, "ganpipe.dataset_hash": dataset, "ganpipe.git_commit": git_commit(),
        DRIVER_TAG: driver_id(),
    }  # fmt: skip
    run = client.create_run(experiment, run_name=name, tags=tags)
    client.log_param(run.info.run_id, "sweep", json.dumps(params.sweep.model_dump(mode="json")))
    return run.info.run_id


def _summarize(setup: Setup, grid, reasons: dict, name: str, parent: str, experiment: str) -> dict:
    """Per-trial table, stability table, candidates, best_params.yaml, MLflow stop tags."""
    params, client, dataset = setup.params, setup.client, setup.dataset_hash
    base = params.model_dump(mode="json")

    def child_run(trial_run: str | None) -> str | None:
        if not trial_run:
            return None
        query = f"tags.`ganpipe.run_name` = '{trial_run}' and tags.`{SWEEP_TAG}` = '{name}'"
        found = client.search_runs([experiment], query, max_results=1)
        return found[0].info.run_id if found else None

    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or "fid_domain" not in frame:
            trials.append({"trial_id": None, "config": result.config, "stop_reason": "error"})
            continue
        trial_id = str(frame["trial_id"].iloc[-1])
        # A PBT trial restored from another's checkpoint may start a new progress file, so
        # its frame can lack the last rows: its last result (result.metrics) has them.
        steps = max(int(frame["step"].max()), int((result.metrics or {}).get("step", 0)))
        fids = [f for f in frame["fid_domain"] if math.isfinite(f)]
        diverged = bool(frame.get("diverged", False).astype(bool).any())
        reason = reasons.get(trial_id) or (
            "diverged" if diverged else "completed" if steps >= params.train.steps
            else "early_stopped"
        )  # fmt: skip
        checkpoints = [c for c in frame.get("checkpoint_path", []) if isinstance(c, str)]
        if result.checkpoint is not None:  # a PBT trial's own (Tune-managed) checkpoint
            checkpoints.append(result.checkpoint.path)
        grown = grown_at_last_checkpoint(frame, params.prepare.resolution,
                                         tune_managed=result.checkpoint is not None)  # fmt: skip
        trials.append({
            "trial_id": trial_id,
            "run_name": run_name(
                trial_params(base, result.config, params.sweep.eval_every), dataset
            ) + f"-{trial_id}",
            "config": result.config,
            "steps": steps,
            "best_fid": min(fids) if fids else None,
            "final_fid": fids[-1] if fids else None,
            "stop_reason": reason,
            "checkpoint": checkpoints[-1] if checkpoints else None,
            "grown": grown,
        })  # fmt: skip
    ranked = sorted(
        (t for t in trials if t.get("final_fid") is not None and t["stop_reason"] != "diverged"
         and t.get("checkpoint") and t["grown"]),
        key=lambda t: t["final_fid"],
    )  # fmt: skip
    for trial in trials:
        run_id = child_run(trial.get("run_name"))
        if run_id and client.get_run(run_id).info.status != "FINISHED":  # never reopened
            client.set_tag(run_id, STOP_TAG, trial["stop_reason"])
            failed = trial["stop_reason"] == "diverged"
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
    best = ranked[: params.sweep.top_k]
    candidates = [
        candidate_record(t["run_name"], child_run(t["run_name"]), t["steps"]) for t in best
    ]
    summary = {
        "sweep_name": name,
        "mlflow_run_id": parent,
        "candidates": candidates,
        "trials": trials,
        "stability": stability_table(trials),
        "trial_steps": sum(t.get("steps", 0) for t in trials),
    }
    local = [functools.partial(local_checkpoint, t["checkpoint"], setup.storage) for t in best]
    write_train_outputs(Path(params.train.out_dir), summary, local, _best_params(base, ranked))
    return summary


def grown_at_last_checkpoint(frame, final_resolution: int, tune_managed: bool = False) -> bool:
    """Whether a trial's last checkpoint holds a generator grown to the final resolution and
    faded in (always, for families that do not grow): a progan trial stopped early by ASHA can
    end before that, and such a checkpoint has nothing to export, so it is no candidate. The
    stage is the one reported with the checkpoint (a Tune-managed PBT checkpoint: the last
    report's)."""
    if "alpha" not in frame:
        return True
    rows = frame
    if not tune_managed and "checkpoint_path" in frame:
        rows = frame[frame["checkpoint_path"].map(lambda c: isinstance(c, str))]
    if rows.empty:
        return False
    last = rows.iloc[-1]
    return int(last["resolution"]) == final_resolution and float(last["alpha"]) == 1.0


def _best_params(base: dict, ranked: list[dict]) -> dict | None:
    """params.yaml with the best trial's values, without the sweep (None: no trial finished)."""
    if not ranked:
        return None
    best = {k: v for k, v in copy.deepcopy(base).items() if k != "sweep"}
    for key, value in ranked[0]["config"].items():
        section, field = key.split(".", 1)
        best[section][field] = value
    return best


def stability_table(trials: list[dict]) -> list[dict]:
    """How trials ended, per loss and learning-rate decade: which settings train stably."""
    counts: dict[tuple, dict] = {}
    for trial in trials:
        config = trial.get("config") or {}
        lr = config.get("train.lr_g") or config.get("train.lr_d")
        decade = f"1e{math.floor(math.log10(lr))}" if lr else "base"
        key = (config.get("train.loss", "base"), decade)
        row = counts.setdefault(key, {"loss": key[0], "lr_decade": key[1], "trials": 0})
        row["trials"] += 1
        row[trial["stop_reason"]] = row.get(trial["stop_reason"], 0) + 1
    return sorted(counts.values(), key=lambda r: (r["loss"], r["lr_decade"]))
