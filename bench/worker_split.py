"""Throughput on one node: N one-CPU Ray workers (DDP) against one worker using every CPU as
threads, both against the plain single-process loop on the same CPUs, in one run.

The model and data are the shipped params.yaml with `--resolution` and `--channels` (digits,
scaled), `--set` overrides on top; every arm trains the same global batch
(`train.batch_size` x workers for the DDP arm, the same number of images in one batch for the
single worker) for `--steps` steps. Ray's figures come from the workers' own interval timing
(history.csv, as in bench/train_overhead.py): start-up excluded, reports and checkpoints
included.

    python bench/worker_split.py --resolution 32 --steps 200
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from train_overhead import plain_rate, ray_rate

from pipeline.config import load_params
from pipeline.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    import ray

    cpus = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:

        def params(name: str, *extra: str):
            return load_params(
                "params.yaml",
                [
                    f"prepare.out_dir={tmp}/prepared", f"prepare.resolution={args.resolution}",
                    f"prepare.channels={args.channels}", f"train.out_dir={tmp}/{name}/out",
                    f"ray.storage_path={tmp}/{name}/runs", f"tracking.uri=sqlite:///{tmp}/db",
                    f"train.steps={args.steps}", "ray.use_gpu=false", *args.overrides, *extra,
                ],
            )  # fmt: skip

        base = params("base")
        global_batch = base.train.batch_size * cpus
        prepare(base, progress=False)
        torch.set_num_threads(cpus)
        plain = plain_rate(params("plain", f"train.batch_size={global_batch}"))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ddp = ray_rate(params("ddp", f"ray.num_workers={cpus}", "ray.cpus_per_worker=1"))
        threads = ray_rate(
            params(
                "threads", "ray.num_workers=1", f"ray.cpus_per_worker={cpus}",
                f"train.batch_size={global_batch}",
            )
        )  # fmt: skip
        ray.shutdown()
    print(f"{cpus} CPUs, {args.resolution}x{args.resolution}x{args.channels}, global batch "
          f"{global_batch}, {args.steps} steps")  # fmt: skip
    print(f"plain loop, {cpus} threads          {plain:8.1f} images/s  1.00x")
    print(f"ray, {cpus} workers x 1 CPU (DDP)    {ddp:8.1f} images/s  {ddp / plain:.2f}x")
    print(f"ray, 1 worker x {cpus} CPUs (threads) {threads:8.1f} images/s  {threads / plain:.2f}x")


if __name__ == "__main__":
    main()
