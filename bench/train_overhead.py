"""Ray Train overhead: the train stage with 1 worker against a plain PyTorch loop.

Same model (the shipped params.yaml on 16x16 digits), batch and steps, measured in one run:
- plain:     gan.step.train_step over pipeline.data.RankLoader in this process, with the
             optimisers the pipeline builds (gan.step.adam) and its metrics left on the device
- ray:       pipeline.train.train with 1 worker at the default report/checkpoint intervals
- ray, a report every 10 steps; ray, a report and a checkpoint every 20 steps: to price them
  (extra seconds per call against the plain loop). Reporting every step is not measured: on
  this machine such a run stalled in ray.train.report after ~70 reports.
Ray's figures come from the workers' own interval timing (history.csv), so Ray's start-up is
excluded and report/checkpoint time is included.

    python bench/train_overhead.py [--steps 300]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from gan.ema import GeneratorEMA
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, adam, train_step
from pipeline.config import load_params
from pipeline.data import PreparedSplit, RankLoader
from pipeline.prepare import prepare
from pipeline.train import train
from pipeline.training.loop import build_models, step_config


def plain_rate(params) -> float:
    t = params.train
    split = PreparedSplit(params.prepare.out_dir, "train")
    torch.manual_seed(t.seed)
    g, d = build_models(params, split.shape, 0)
    betas = (t.beta1, t.beta2)
    state = GANTrainState(
        g, d, adam(g.parameters(), t.lr_g, betas), adam(d.parameters(), t.lr_d, betas),
        GeneratorEMA(g, t.ema_kimg * 1000, t.batch_size, t.ema_rampup),
    )  # fmt: skip
    batches = RankLoader(split, t.batch_size, seed=t.seed).forever()
    cfg, sampler = step_config(params, torch.device("cpu")), LatentSampler(params.model.z_dim)
    train_step(state, batches, cfg, sampler, step_generator(0, 0, 0), 0)  # warm-up
    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        train_step(state, batches, cfg, sampler, step_generator(t.seed, 0, step), step)
    return t.steps * t.batch_size * t.n_critic / (time.perf_counter() - start)


def ray_rate(params) -> float:
    train(params)
    with open(Path(params.train.out_dir) / "history.csv") as f:
        rows = list(csv.DictReader(f))[1:]  # the first interval holds start-up work
    steps = [int(r["step"]) for r in rows]
    intervals = [
        b - a for a, b in zip([steps[0] - params.train.log_every, *steps], steps, strict=False)
    ]
    images = [n * params.train.batch_size * params.train.n_critic for n in intervals]
    seconds = sum(i / float(r["images_per_s"]) for i, r in zip(images, rows, strict=True))
    return sum(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:

        def params(name: str, *extra: str):
            return load_params(
                "params.yaml",
                [
                    f"prepare.out_dir={tmp}/prepared", f"train.out_dir={tmp}/{name}/out",
                    f"ray.storage_path={tmp}/{name}/runs", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                    f"train.steps={args.steps}", "ray.num_workers=1", "ray.use_gpu=false", *extra,
                ],
            )  # fmt: skip

        base = params("default")
        prepare(base, progress=False)
        torch.set_num_threads(1)  # the Ray worker gets one CPU: compare like with like
        plain = plain_rate(base)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        default = ray_rate(base)
        every = ray_rate(params("report-10", "train.log_every=10", "train.checkpoint_every=100000"))
        ckpt = ray_rate(params("checkpoint-20", "train.log_every=20", "train.checkpoint_every=20"))
        ray.shutdown()
    batch = base.train.batch_size
    # a report only blocks while the controller has not taken the previous one; the checkpoint
    # run pays for a report plus a checkpoint every 20 steps
    report_cost = 10 * (batch / every - batch / plain)
    checkpoint_cost = 20 * (batch / ckpt - batch / plain)
    print(
        f"steps={args.steps} batch={batch} defaults: log_every={base.train.log_every} "
        f"checkpoint_every={base.train.checkpoint_every}"
    )
    print(f"plain loop                  {plain:8.1f} images/s")
    overhead = 100 * (1 - default / plain)
    print(f"ray, 1 worker, defaults     {default:8.1f} images/s  overhead {overhead:5.1f}%")
    print(f"ray, report every 10 steps  {every:8.1f} images/s  {report_cost:6.2f} s per report")
    print(f"ray, report+ckpt every 20   {ckpt:8.1f} images/s  {checkpoint_cost:6.2f} s per pair")


if __name__ == "__main__":
    main()
