"""The `train` stage: DDP GAN training on Ray Train (V2), checkpointed, resumable, tracked.

The driver (`train`) validates the data, names the run after its configuration and dataset
version, opens the MLflow run and starts a TorchTrainer; every worker runs `train_worker`.
Rank 0 does the I/O (checkpoints, MLflow); every rank computes.

DDP choices for a GAN (both networks are wrapped separately, one `prepare_model` each):
- forward_sync_buffers=True (formerly broadcast_buffers): BatchNorm running statistics are
  copied from rank 0 at each forward,
  so every rank holds the same buffers, and the EMA generator (which copies them) agrees too.
- find_unused_parameters=False: every parameter of the trained network gets a gradient in its
  phase. In the generator phase the discriminator is only used: gan.step freezes its
  parameters and calls it under `no_sync`, so its reducer neither waits for nor all-reduces
  gradients (the fake batch is detached in the discriminator phase, see STACK_NOTES).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gan.ema import GeneratorEMA
from gan.models import build_discriminator
from gan.sampling import LatentSampler, fixed_latents, step_generator
from gan.step import GANTrainState, NonFiniteError, StepConfig, adam, to_floats, train_step
from pipeline.candidates import BEST_PARAMS, RESULT, generator_spec
from pipeline.checkpoint import (
    CheckpointError,
    TrainingState,
    all_damaged_message,
    load_checkpoint,
    newest_intact,
    save_checkpoint,
)
from pipeline.cluster import close_runs_if_killed, connect, is_remote, storage_root, use_gpu
from pipeline.config import Params, flatten
from pipeline.data import (
    PreparedSplit,
    RankLoader,
    check_labels_for_model,
    check_split_fits_batch,
)
from pipeline.params_yaml import dump_yaml
from pipeline.recipes import recipe_for
from pipeline.shards import verify_prepared

# Keys that may change between a run and its resumption: they say how long and how often,
# not what is trained. Everything else in model/train (and the dataset) names the run.
RESUMABLE_KEYS = {"steps", "log_every", "checkpoint_every", "debug_checks", "out_dir"}
HISTORY = "history.csv"
CANDIDATES = "candidates"  # <train.out_dir>/candidates/<run name>: final checkpoints
DIVERGED_TAG = "ganpipe.diverged_at_step"
DIVERGED_REASON_TAG = "ganpipe.diverged_reason"


class ResumeMismatchError(ValueError):
    """A run's checkpoint was trained with a different configuration."""


def run_identity(params: Params, dataset_hash: str) -> dict:
    """What a run is: model, training (minus how long/often), workers and data version."""
    train = {
        k: v for k, v in params.train.model_dump(mode="json").items() if k not in RESUMABLE_KEYS
    }
    return {
        "model": params.model.model_dump(mode="json"),
        "train": train,
        "num_workers": params.ray.num_workers,
        "dataset": dataset_hash,
    }


def run_name(params: Params, dataset_hash: str) -> str:
    digest = hashlib.sha256(json.dumps(run_identity(params, dataset_hash), sort_keys=True).encode())
    return f"gan-{params.model.family}-{digest.hexdigest()[:12]}"


def check_same_run(saved: dict, current: dict) -> None:
    """Resuming with another configuration is a hard error that shows the difference."""
    before, now = flatten(saved), flatten(current)
    diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if diff:
        lines = "\n".join(
            f"  {k}: checkpoint {before.get(k)!r} != now {now.get(k)!r}" for k in diff
        )
        raise ResumeMismatchError(
            f"the run's checkpoint was trained with a different configuration:\n{lines}"
        )


def build_models(params: Params, shape: tuple[int, int, int], num_classes: int):
    """Generator and discriminator for the prepared image shape."""
    m = params.model
    height, _, channels = shape
    g = generator_spec(m.model_dump(mode="json"), shape, num_classes).build()
    d = build_discriminator(
        m.family, channels=channels, resolution=height, width=m.d_width, num_classes=num_classes,
        mlp_depth=m.mlp_depth, norm=m.d_norm, spectral_norm=m.spectral_norm_d,
    )  # fmt: skip
    return g, d


def step_config(params: Params, device: torch.device) -> StepConfig:
    t = params.train
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    use_bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and bf16)
    return StepConfig(
        loss=t.loss, n_critic=t.n_critic, gp_weight=t.gp_weight, r1_gamma=t.r1_gamma,
        r1_every=t.r1_every, diffaugment=t.diffaugment,
        autocast_dtype=torch.bfloat16 if use_bf16 else None,
    )  # fmt: skip


def weights_agree(modules) -> bool:
    """True when every rank holds the same parameters (one all-reduce of a checksum)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([p.detach().double().flatten() for m in modules for p in m.parameters()])
    local = torch.stack([flat.sum(), flat.square().sum()])
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


class TrainSession:
    """Where the loop runs: a Ray Train worker (DDP across ranks). `TuneSession` runs the same
    loop as a plain single-process Tune trial (what Population Based Training needs)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        ddp = {"forward_sync_buffers": True, "find_unused_parameters": False}
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, directory: Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """One process, one rank: a Tune function trainable reports and restores itself."""

    rank, world = 0, 1

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict, directory: Path | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(directory) if directory else None
        tune.report(metrics, checkpoint=checkpoint)


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    train_loop(config, TrainSession())


def train_loop(config: dict, session) -> None:
    """Restore, train, report and checkpoint (rank 0) in a TrainSession or TuneSession.

    With config["pbt"], a restored checkpoint may come from another trial with other
    hyperparameters (Population Based Training's exploit): it is not checked against this
    run's identity, and the optimisers take this trial's (mutated) learning rates and betas."""
    params = Params.model_validate(config["params"])
    t = params.train
    rank, world, device = session.rank, session.world, session.device
    data = PreparedSplit(params.prepare.out_dir, "train")
    num_classes = len(data.class_names) if params.model.conditional else 0

    torch.manual_seed(t.seed)
    g, d = build_models(params, data.shape, num_classes)
    if _enabled(t.channels_last, device):
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    g, d = session.prepare(g), session.prepare(d)
    if t.compile:
        g, d = torch.compile(g), torch.compile(d)
    betas = (t.beta1, t.beta2)
    state = GANTrainState(
        g, d,
        adam(g.parameters(), t.lr_g, betas),
        adam(d.parameters(), t.lr_d, betas),
        # from rank 0's broadcast weights
        GeneratorEMA(g, t.ema_kimg * 1000, t.batch_size * world, t.ema_rampup),
    )  # fmt: skip
    modules = {"generator": g, "generator_ema": state.ema.model, "discriminator": d}
    optimizers = {"opt_g": state.opt_g, "opt_d": state.opt_d}
    loader = RankLoader(data, t.batch_size, rank, world, t.seed, num_classes > 0, device)
    identity = config["identity"]
    nodes = _node_ids()  # a collective: every rank takes part
    if rank == 0 and config.get("mlflow_run_id"):
        _tag(config, "ganpipe.num_nodes", str(len(set(nodes))))

    start, history = 0, []
    checkpoint = session.checkpoint()
    if checkpoint:
        saved, history = restore(checkpoint, modules, optimizers, rank)
        if config.get("pbt"):
            _apply_hyperparameters(state, t)
        else:
            check_same_run(saved.params, identity)
        start = saved.step
    consumed = start * t.n_critic
    batches = loader.forever(consumed // len(loader), consumed % len(loader))
    cfg, sampler = step_config(params, device), LatentSampler(params.model.z_dim, num_classes)

    monitor = _system_metrics(config) if rank == 0 else None
    sweep_eval = config.get("trial_eval")  # a sweep trial: scored at every report
    evaluator = None
    if sweep_eval and rank == 0:
        from pipeline.evaluate import TrialEvaluator

        evaluator = TrialEvaluator(sweep_eval)
    spec = generator_spec(params.model.model_dump(mode="json"), data.shape, num_classes)
    try:
        faults = config.get("faults") or {}
        tick, images = time.perf_counter(), 0
        for step in range(start, t.steps):
            _inject_faults(faults, rank, step, g)
            metrics = train_step(
                state, batches, cfg, sampler, step_generator(t.seed, rank, step), step
            )
            images += t.batch_size * t.n_critic * world
            done = step + 1
            if done % t.log_every and done % t.checkpoint_every and done != t.steps:
                continue
            try:  # the step skips non-finite updates; a report names the first (gan.step)
                state.divergence.raise_if_diverged()
            except NonFiniteError as exc:  # every rank raises at the same report
                if rank == 0 and config.get("mlflow_run_id"):
                    _mark_diverged(config, exc)
                # A sweep's scheduler needs its metric in every result: the worst there is.
                worst = {"fid_domain": float("inf")} if sweep_eval else {}
                session.report({"step": exc.step, "diverged": True, **worst})
                return
            elapsed = time.perf_counter() - tick  # after the device caught up (one transfer)
            metrics = to_floats(metrics) | {
                "step": done, "images_per_s": images / elapsed, "diverged": False
            }  # fmt: skip
            saving = done % t.checkpoint_every == 0 or done == t.steps
            if evaluator is not None or saving:  # statistics for the averaged weights
                state.ema.averaged(sampler, t.seed)
            if evaluator is not None:
                metrics |= evaluator(state.ema.model, spec)
            tick, images = time.perf_counter(), 0
            history.append(metrics)
            if rank == 0 and config.get("mlflow_run_id"):
                _log_metrics(config, metrics, done)
            to_save = None
            if saving:
                if t.debug_checks and not weights_agree([g, d, state.ema.model]):
                    raise RuntimeError(f"ranks hold different weights at step {done}")
                if rank == 0:
                    consumed = done * t.n_critic
                    position = TrainingState(
                        done,
                        consumed // len(loader),
                        consumed % len(loader),
                        identity,
                        data.dataset_hash,
                        config.get("mlflow_run_id"),
                    )
                    to_save = checkpoint_scratch()
                    save_checkpoint(to_save, modules, optimizers, position)
                    _write_history(to_save / HISTORY, history)
                    grid = _save_sample_grid(state.ema.model, params, num_classes, device, to_save)
                    if config.get("mlflow_run_id"):
                        _log_artifact(config, grid, f"samples/step_{done:07d}.png")
            session.report(metrics, to_save)
            if to_save:
                shutil.rmtree(to_save.parent, ignore_errors=True)
    finally:
        if monitor is not None:
            monitor.finish()


def restore(checkpoint, modules: dict, optimizers: dict, rank: int):
    """Load Ray's checkpoint of this run, or where it is damaged (cut short by a full disk, a
    killed copy) the newest intact one Ray keeps before it; (TrainingState, history rows)."""
    damaged = []
    for candidate in [checkpoint, *_earlier_checkpoints(checkpoint)]:
        with candidate.as_directory() as directory:
            try:
                saved = load_checkpoint(Path(directory), modules, optimizers)
            except CheckpointError as exc:
                damaged.append(str(exc))
                continue
            history = _read_history(Path(directory) / HISTORY)
        if damaged and rank == 0:
            print(
                f"train: skipped damaged checkpoints ({'; '.join(damaged)}); resumed from "
                f"{candidate.path} (step {saved.step})", file=sys.stderr, flush=True,
            )  # fmt: skip
        return saved, history
    raise CheckpointError(all_damaged_message(damaged))


def _earlier_checkpoints(checkpoint) -> list:
    """The other checkpoints of the run in `checkpoint`'s storage, newest first (Ray names
    them checkpoint_<time>)."""
    from pyarrow import fs
    from ray.train import Checkpoint

    parent, _, own = checkpoint.path.rstrip("/").rpartition("/")
    try:
        infos = checkpoint.filesystem.get_file_info(fs.FileSelector(parent))
    except OSError:
        return []
    names = sorted(
        (i.base_name for i in infos if i.type == fs.FileType.Directory
         and i.base_name.startswith("checkpoint_") and i.base_name < own),
        reverse=True,
    )  # fmt: skip
    return [Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in names]


SCRATCH_PREFIX = "ganpipe-ckpt-"


def checkpoint_scratch() -> Path:
    """An empty directory to write a checkpoint into before report() uploads it. Tune kills
    the workers of a trial it stops inside report(), before they can remove theirs, so the
    directory is named after this process and those of processes that are gone are removed
    first: a sweep leaves at most one per live worker in the temp folder."""
    base = Path(tempfile.gettempdir())
    _remove_dead_workers_scratch(base)
    own = base / f"{SCRATCH_PREFIX}{os.getpid()}"
    shutil.rmtree(own, ignore_errors=True)
    return own / "ckpt"


@functools.cache
def _remove_dead_workers_scratch(base: Path) -> None:
    """Once per process and temp folder: not a scan of the folder at every checkpoint."""
    for stale in base.glob(f"{SCRATCH_PREFIX}*"):
        pid = stale.name.removeprefix(SCRATCH_PREFIX)
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _apply_hyperparameters(state: GANTrainState, t) -> None:
    """Optimiser settings from params, over those a restored checkpoint brought along."""
    for optimizer, lr in ((state.opt_g, t.lr_g), (state.opt_d, t.lr_d)):
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, (t.beta1, t.beta2)


def _system_metrics(config: dict):
    """MLflow's CPU/memory/GPU sampler on rank 0's node (every 10 s), or None if untracked."""
    if not config.get("mlflow_run_id"):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        config["mlflow_run_id"], sampling_interval=10, resume_logging=True,
        tracking_uri=config["tracking_uri"],
    )  # fmt: skip
    monitor.start()
    return monitor


def _enabled(option: str, device: torch.device) -> bool:
    """'auto' means on for GPUs, off on CPU."""
    return option == "on" or (option == "auto" and device.type == "cuda")


SAMPLES = "samples.png"
# What a run or a sweep writes in train.out_dir: the entries it replaces, and only those.
OUTPUTS = (RESULT, BEST_PARAMS, CANDIDATES, HISTORY, SAMPLES)
STAGE, OUT_DIR_KEY = "train", "train.out_dir"


def check_train_outputs(params: Params) -> None:
    """Refuse, before any work, a train.out_dir whose entries of our names ganpipe did not
    write (a user's own samples.png would otherwise be replaced at the end)."""
    from pipeline.files import check_output_dir

    check_output_dir(
        params.train.out_dir, STAGE, OUT_DIR_KEY, names=OUTPUTS, recognise=earlier_train_outputs
    )


def earlier_train_outputs(out_dir: Path) -> list[str]:
    """What a train stage wrote in `out_dir` before pipeline.files' markers: our entries, when
    its result.json says so."""
    try:
        ours = "candidates" in json.loads((Path(out_dir) / RESULT).read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    return list(OUTPUTS) if ours else []


def _save_sample_grid(
    ema_generator, params: Params, num_classes: int, device, directory: Path
) -> Path:
    """An 8x8 grid of the EMA generator's samples on fixed noise (labels cycle the classes)."""
    from torchvision.utils import save_image

    z, labels = fixed_latents(64, params.model.z_dim, num_classes, params.train.seed, device)
    with torch.no_grad():
        images = ema_generator(z, labels).float()
    path = directory / SAMPLES
    save_image((images + 1) / 2, path, nrow=8)
    return path


def _log_artifact(config: dict, path: Path, name: str) -> None:
    """Log `path` under the artifact path `name` (directory/filename) of the MLflow run."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / Path(name).name
        shutil.copy(path, target)
        MlflowClient(config["tracking_uri"]).log_artifact(
            config["mlflow_run_id"], str(target), str(Path(name).parent)
        )


def _inject_faults(faults: dict, rank: int, step: int, generator) -> None:
    """Fault drills (tests, chaos runs): kill a worker once, or poison the weights.

    exit_rank/exit_at_step/marker: that rank exits abruptly at that step, once (the marker
    file remembers), as a lost node would. nan_at_step: the generator's weights turn NaN.
    """
    if step == faults.get("exit_at_step") and rank == faults.get("exit_rank"):
        marker = Path(faults["marker"])
        if not marker.exists():
            marker.touch()
            os._exit(1)
    if step == faults.get("nan_at_step"):
        with torch.no_grad():
            for p in generator.parameters():
                p.fill_(float("nan"))


def _write_history(path: Path, rows: list[dict]) -> None:
    fields = sorted({k for row in rows for k in row if k != "error"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    parse = {"diverged": lambda v: v == "True", "step": int}
    with open(path, newline="") as f:
        return [{k: parse.get(k, float)(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _log_metrics(config: dict, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step) for k, v in metrics.items() if k not in ("step", "diverged")
    ]
    MlflowClient(config["tracking_uri"]).log_batch(config["mlflow_run_id"], metrics=batch)


def _node_ids() -> list[str]:
    """The Ray node id of every rank (an all-gather), so a run records how many nodes it used."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _tag(config: dict, key: str, value: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(config["tracking_uri"]).set_tag(config["mlflow_run_id"], key, value)


def _mark_diverged(config: dict, exc: NonFiniteError) -> None:
    _tag(config, DIVERGED_TAG, str(exc.step))
    _tag(config, DIVERGED_REASON_TAG, str(exc)[:5000])


def _for_workers(params: Params) -> dict:
    """Params as JSON with local paths made absolute: Ray workers run in other directories."""
    tree = params.model_dump(mode="json")
    tree["prepare"]["out_dir"] = str(Path(params.prepare.out_dir).resolve())
    return tree


def resumable_checkpoint(storage: str, name: str, identity: dict, steps: int):
    """Before starting Ray: the checkpoint a local run of this name resumes from (the newest
    intact one: a damaged newer one is named and skipped, as the workers skip it), which must
    have been trained like this one and not past `steps`; None when there is none (or the
    storage is remote: the workers check what they restore)."""
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
        "ganpipe.recipe": recipe_for(params.prepare.resolution).name,
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


def _choose_mlflow_run(client, params: Params, name: str, found) -> tuple[str | None, str | None]:
    """The MLflow run this attempt continues (None: a new one), and the FINISHED run whose
    checkpoint it resumes, if that is what it does.

    The run that wrote the checkpoint being resumed is continued while it is unfinished. A
    FINISHED one is never reopened: its checkpoint trained on makes a new run that names it;
    without a checkpoint (runs/ deleted) training starts over as a new run."""
    from pipeline.tracking import RUN_NAME_TAG, experiment_id, unfinished_run

    experiment = experiment_id(client, params.tracking.experiment)
    by_name = f"tags.`{RUN_NAME_TAG}` = '{name}'"
    if found is None:
        if is_remote(storage_root(params)):  # the driver does not read remote checkpoints
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


def train(params: Params, faults: dict | None = None) -> dict:
    """Run (or resume) training; write result.json, the final checkpoint and the history.

    `faults` injects failures for drills and tests (see `_inject_faults`). With a search
    space in `sweep.space`, runs a Ray Tune sweep instead (pipeline.sweep)."""
    from mlflow.tracking import MlflowClient

    if params.sweep.space:
        from pipeline.sweep import sweep

        return sweep(params)

    from pipeline.tracking import (
        RESUMED_FROM_TAG,
        check_reachable,
        close_abandoned_runs,
        experiment_id,
        reopen_run,
        tracking_uri,
    )

    check_train_outputs(params)
    manifest = verify_prepared(params.prepare.out_dir, ["train"])
    check_labels_for_model(manifest, params.model.conditional)
    check_split_fits_batch(manifest, params.train.batch_size, params.ray.num_workers)
    identity = run_identity(params, manifest["dataset_hash"])
    name = run_name(params, manifest["dataset_hash"])
    storage = storage_root(params)
    found = resumable_checkpoint(storage, name, identity, params.train.steps)
    uri = tracking_uri(params)
    check_reachable(uri)
    client = MlflowClient(uri)
    run_id, finished = _choose_mlflow_run(client, params, name, found)
    if finished and found.state["step"] == params.train.steps:  # nothing left to train
        return _outputs_of_finished_run(params, name, found, finished, manifest)
    connect(params)  # before the MLflow run: a cluster that cannot be joined leaves no trace
    experiment = experiment_id(client, params.tracking.experiment)
    close_abandoned_runs(client, experiment)
    close_runs_if_killed(uri, experiment)
    if run_id is None:
        resumed = {RESUMED_FROM_TAG: finished, "ganpipe.resumed_from_step": str(
            found.state["step"])} if finished else {}  # fmt: skip
        run_id = open_mlflow_run(client, params, name, manifest["dataset_hash"], resumed)
    else:
        reopen_run(client, run_id, clear_tags=(DIVERGED_TAG, DIVERGED_REASON_TAG))

    try:
        with graceful_signals():
            result = _fit(params, name, storage, {
            "params": _for_workers(params),
            "identity": identity,
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "faults": faults,
            })  # fmt: skip
        diverged_at = client.get_run(run_id).data.tags.get(DIVERGED_TAG)
        reached = int(result.metrics.get("step", 0)) if result.metrics else 0
        if diverged_at is None and reached < params.train.steps:  # aborted gracefully
            raise KeyboardInterrupt(f"training interrupted; last checkpoint at step {reached}")
        summary = _summary(params, name, run_id, manifest, result.checkpoint, result.metrics)
        summary |= {
            "diverged": diverged_at is not None,
            "diverged_at_step": int(diverged_at) if diverged_at is not None else None,
        }
        for candidate in summary["candidates"]:
            candidate["diverged"] = diverged_at is not None
        _write_outputs(Path(params.train.out_dir), result.checkpoint, summary, params)
    except (KeyboardInterrupt, SystemExit):  # Ray exits from its handler if the abort races
        client.set_terminated(run_id, status="KILLED")
        raise KeyboardInterrupt("training interrupted") from None
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FAILED" if summary["diverged"] else "FINISHED")
    return summary


def _summary(params: Params, name: str, run_id: str, manifest: dict, checkpoint, metrics) -> dict:
    """result.json of a single run whose last checkpoint is `checkpoint` (a Ray Checkpoint or
    None), reported with `metrics`."""
    reached = int(metrics.get("step", 0)) if metrics else 0
    return {
        "run_name": name,
        "mlflow_run_id": run_id,
        "dataset_hash": manifest["dataset_hash"],
        "diverged": False,
        "diverged_at_step": None,
        "checkpoint": checkpoint.path if checkpoint else None,
        "steps": reached,  # of the last checkpoint (Ray's Result.metrics come from it)
        "global_batch_size": params.global_batch_size,
        "candidates": [
            {
                "name": name,
                "checkpoint": f"{CANDIDATES}/{name}",
                "mlflow_run_id": run_id,
                "diverged": False,
                "steps": reached,
            }
        ]
        if checkpoint
        else [],
        "final_metrics": {
            k: v
            for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
    }


def _outputs_of_finished_run(params: Params, name: str, found, run_id: str, manifest) -> dict:
    """The outputs of a run whose FINISHED MLflow run already trained every step (train.out_dir
    deleted, or `dvc repro -f`): written again from its checkpoint without Ray, and the run,
    the provenance of what was registered from it, left exactly as it is."""
    from ray.train import Checkpoint

    history = _read_history(found.path / HISTORY)
    metrics = history[-1] if history else {"step": found.state["step"]}
    checkpoint = Checkpoint.from_directory(str(found.path))
    summary = _summary(params, name, run_id, manifest, checkpoint, metrics)
    _write_outputs(Path(params.train.out_dir), checkpoint, summary, params)
    print(
        f"train: {name} was already trained to step {found.state['step']} by MLflow run "
        f"{run_id} (FINISHED); outputs written again from {found.path}",
        file=sys.stderr,
    )
    return summary


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


def _fit(params: Params, name: str, storage: str, worker_config: dict, callbacks=()):
    """Run the TorchTrainer on the connected Ray; Ray's Result. `callbacks` are Ray Train
    callbacks (a sweep trial forwards the reports to Tune with one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config,
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
        ),
    )
    return trainer.fit()


def _write_outputs(out: Path, checkpoint, summary: dict, params: Params) -> None:
    """result.json, the final checkpoint, the history, the last sample grid and the params
    (best_params.yaml: a single run's are its own; a sweep writes its best trial's), each
    replacing its earlier version only once all are written."""

    from pipeline.files import replace_entries, staging_dir

    staging = staging_dir(out)
    try:
        tree = params.model_dump(mode="json", exclude={"sweep"})
        (staging / BEST_PARAMS).write_text(dump_yaml(tree))
        if checkpoint:
            with checkpoint.as_directory() as directory:
                shutil.copytree(directory, staging / CANDIDATES / summary["run_name"])
                for name in (HISTORY, SAMPLES):
                    if (Path(directory) / name).is_file():
                        shutil.copy(Path(directory) / name, staging / name)
        (staging / RESULT).write_text(json.dumps(summary, indent=2) + "\n")
        replace_entries(staging, out, STAGE, OUT_DIR_KEY, earlier_train_outputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
