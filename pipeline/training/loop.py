"""The worker loop: restore, train, report and checkpoint, in a Ray Train worker (every rank
computes; rank 0 does the I/O: checkpoints, MLflow) or in a Tune trial (PBT)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gan.ema import GeneratorEMA
from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, fixed_latents, step_generator
from gan.step import GANTrainState, NonFiniteError, StepConfig, adam, to_floats, train_step
from pipeline.artifacts import HISTORY, TRAIN_SAMPLES
from pipeline.candidates import generator_spec
from pipeline.checkpoint import TrainingState, save_checkpoint
from pipeline.config import Params
from pipeline.config.growth import (
    batches_before,
    growth_schedule,
    images_counter,
    loader_batch_size,
)
from pipeline.console import quiet_libraries
from pipeline.data import PreparedSplit, RankLoader
from pipeline.training.checkpoints import checkpoint_scratch, restore, write_history
from pipeline.training.growth import AtFinalSize, Growth, upsampled
from pipeline.training.identity import check_same_run
from pipeline.training.sessions import TrainSession
from pipeline.training.tracker import SAMPLES_KEY, RunTracker
from pipeline.training.worker_config import WorkerConfig


def build_models(params: Params, shape: tuple[int, int, int], num_classes: int):
    """Generator and discriminator for the prepared image shape."""
    m = params.model
    height, _, channels = shape
    spec = generator_spec(m.model_dump(mode="json"), shape, num_classes)
    g = build_generator(  # what the spec builds, plus, for progan, every resolution's layers
        spec.family, channels=channels, resolution=height, z_dim=spec.z_dim, width=spec.width,
        num_classes=spec.num_classes, mlp_depth=spec.mlp_depth, spectral_norm=spec.spectral_norm,
        start_resolution=m.start_resolution, growing=True,
    )  # fmt: skip
    d = build_discriminator(
        m.family, channels=channels, resolution=height, width=m.d_width, num_classes=num_classes,
        mlp_depth=m.mlp_depth, norm=m.d_norm, spectral_norm=m.spectral_norm_d,
        start_resolution=m.start_resolution,
    )  # fmt: skip
    return g, d


def step_config(params: Params, device: torch.device) -> StepConfig:
    t = params.train
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    use_bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and bf16)
    return StepConfig(
        loss=t.loss, n_critic=t.n_critic, gp_weight=t.gp_weight, r1_gamma=t.r1_gamma,
        r1_every=t.r1_every, drift_weight=t.drift_weight, diffaugment=t.diffaugment,
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


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker (Ray hands it a dict: the WorkerConfig is inside)."""
    train_loop(loop_config["worker"], TrainSession())


def train_loop(config: WorkerConfig, session) -> None:
    """Restore, train, report and checkpoint (rank 0) in a TrainSession or TuneSession.

    With config.pbt, a restored checkpoint may come from another trial with other
    hyperparameters (Population Based Training's exploit): it is not checked against this
    run's identity, and the optimisers take this trial's (mutated) learning rates and betas."""
    config.check()
    quiet_libraries(config.log_level)
    params = config.params
    t = params.train
    rank, world, device = session.rank, session.world, session.device
    data = PreparedSplit(params.prepare.out_dir, "train")
    num_classes = len(data.class_names) if params.model.conditional else 0
    tracker = RunTracker(config.run if rank == 0 else None)

    torch.manual_seed(t.seed)
    g, d = build_models(params, data.shape, num_classes)
    if _enabled(t.channels_last, device):
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    schedule = growth_schedule(params)  # progan: the stage of every step
    shown = images_counter(params)  # real images before a step: the batch may change
    g, d = session.prepare(g, schedule is not None), session.prepare(d, schedule is not None)
    if t.compile:
        g, d = torch.compile(g), torch.compile(d)
    betas = (t.beta1, t.beta2)
    state = GANTrainState(
        g, d,
        adam(g.parameters(), t.lr_g, betas),
        adam(d.parameters(), t.lr_d, betas),
        # from rank 0's broadcast weights
        GeneratorEMA(
            g, t.ema_kimg * 1000, t.batch_size * world, t.ema_rampup,
            lambda k: shown(k) // t.n_critic,
        ),
    )  # fmt: skip
    modules = {"generator": g, "generator_ema": state.ema.model, "discriminator": d}
    optimizers = {"opt_g": state.opt_g, "opt_d": state.opt_d}
    growth = None
    if schedule is not None:
        growth = Growth(params, schedule, [g, d, state.ema.model], [state.opt_g, state.opt_d])
    loader = RankLoader(data, loader_batch_size(params), rank, world, t.seed, num_classes > 0,
                        device)  # fmt: skip
    nodes = _node_ids()  # a collective: every rank takes part
    tracker.tag("ganpipe.num_nodes", str(len(set(nodes))))

    start, history = 0, []
    checkpoint = session.checkpoint()
    if checkpoint:
        saved, history = restore(checkpoint, modules, optimizers, rank)
        if config.pbt:
            _apply_hyperparameters(state, t)
        else:
            check_same_run(saved.params, config.identity)
        start = saved.step
    consumed = batches_before(params, start)
    batches = loader.forever(consumed // len(loader), consumed % len(loader))
    if growth is not None:  # full-resolution shards, reduced to the stage on the fly
        batches = growth.reals(batches)
    cfg, sampler = step_config(params, device), LatentSampler(params.model.z_dim, num_classes)

    monitor = tracker.system_metrics()
    evaluator = None
    if config.scoring is not None and rank == 0:  # a sweep trial: scored at every report
        from pipeline.scoring import TrialEvaluator

        evaluator = TrialEvaluator(config.scoring)
    spec = generator_spec(params.model.model_dump(mode="json"), data.shape, num_classes)
    try:
        tick, images = time.perf_counter(), 0
        for step in range(start, t.steps):
            if growth is not None:
                growth.before_step(step)
            if config.faults is not None:
                config.faults.inject(rank, step, g)
            metrics = train_step(
                state, batches, cfg, sampler, step_generator(t.seed, rank, step), step
            )
            done = step + 1
            images += shown(done) - shown(step)
            if done % t.log_every and done % t.checkpoint_every and done != t.steps:
                continue
            try:  # the step skips non-finite updates; a report names the first (gan.step)
                state.divergence.raise_if_diverged()
            except NonFiniteError as exc:  # every rank raises at the same report
                tracker.mark_diverged(exc.step, str(exc))
                # A sweep's scheduler needs its metric in every result: the worst there is.
                worst = {"fid_domain": float("inf")} if config.scoring else {}
                session.report({"step": exc.step, "diverged": True, **worst})
                return
            elapsed = time.perf_counter() - tick  # after the device caught up (one transfer)
            metrics = to_floats(metrics) | {
                "step": done, "images_per_s": images / elapsed, "diverged": False
            }  # fmt: skip
            if growth is not None:
                metrics |= {"resolution": growth.stage.resolution, "alpha": growth.stage.alpha}
            saving = done % t.checkpoint_every == 0 or done == t.steps
            if evaluator is not None or saving:  # statistics for the averaged weights
                state.ema.averaged(sampler, t.seed)
            if evaluator is not None:
                scored = state.ema.model
                if growth is not None:
                    scored = AtFinalSize(scored, params.prepare.resolution)
                metrics |= evaluator(scored, spec)
            tick, images = time.perf_counter(), 0
            history.append(metrics)
            tracker.log_metrics(metrics, done, _progress(metrics, t, shown))
            to_save = None
            if saving:
                if t.debug_checks and not weights_agree([g, d, state.ema.model]):
                    raise RuntimeError(f"ranks hold different weights at step {done}")
                if rank == 0:
                    consumed = batches_before(params, done)
                    position = TrainingState(
                        done,
                        consumed // len(loader),
                        consumed % len(loader),
                        config.identity,
                        data.dataset_hash,
                        config.run.run_id if config.run else None,
                        None if growth is None else asdict(growth.stage),
                    )
                    to_save = checkpoint_scratch()
                    save_checkpoint(to_save, modules, optimizers, position)
                    write_history(to_save / HISTORY, history)
                    grid = _save_sample_grid(state.ema.model, params, num_classes, device, to_save)
                    tracker.log_image(grid, SAMPLES_KEY, done)
            session.report(metrics, to_save)
            if to_save:
                shutil.rmtree(to_save.parent, ignore_errors=True)
    finally:
        if monitor is not None:
            monitor.finish()


def _progress(metrics: dict, t, shown) -> dict:
    """What the driver's progress line shows of this report (pipeline.console); `shown`:
    step -> real images before it."""
    rate = metrics["images_per_s"]
    left = shown(t.steps) - shown(metrics["step"])
    keys = ("step", "images_per_s", "loss_d", "loss_g", "fid_domain")
    return {
        **{k: metrics[k] for k in keys if k in metrics},
        "steps": t.steps,
        "eta_s": left / rate if rate > 0 else None,
    }


def _apply_hyperparameters(state: GANTrainState, t) -> None:
    """Optimiser settings from params, over those a restored checkpoint brought along."""
    for optimizer, lr in ((state.opt_g, t.lr_g), (state.opt_d, t.lr_d)):
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, (t.beta1, t.beta2)


def _enabled(option: str, device: torch.device) -> bool:
    """'auto' means on for GPUs, off on CPU."""
    return option == "on" or (option == "auto" and device.type == "cuda")


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


def _save_sample_grid(
    ema_generator, params: Params, num_classes: int, device, directory: Path
) -> Path:
    """An 8x8 grid of the EMA generator's samples on fixed noise (labels cycle the classes)."""
    from torchvision.utils import save_image

    z, labels = fixed_latents(64, params.model.z_dim, num_classes, params.train.seed, device)
    with torch.no_grad():  # a growing generator's at its stage, shown at the final size
        images = upsampled(ema_generator(z, labels).float(), params.prepare.resolution)
    path = directory / TRAIN_SAMPLES
    save_image((images + 1) / 2, path, nrow=8)
    return path
