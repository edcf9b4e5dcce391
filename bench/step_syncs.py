"""Host synchronisations per training step, and the step's CUDA throughput (issue 14).

For a machine with a GPU; without CUDA it exits with a message. The shipped model
(params.yaml on 16x16 digits: pipeline.training.loop.build_models and step_config, the
optimisers of gan.step.adam) runs gan.step.train_step over pipeline.data.RankLoader on the
GPU, in one process, no Ray:
- syncs: `--sync-steps` steps under torch.cuda.set_sync_debug_mode("warn"); every warning is
  one host synchronisation, counted per step and by where it came from (file:line). A report's
  reads (gan.step.to_floats and Divergence.raise_if_diverged) are counted apart.
- images/s at each `--batch` (64 and 512), fp32 and bf16 autocast, with the fused Adam (the
  update skipped on the device) and with a plain Adam (the host fallback: one read per
  update), over `--steps` steps after a warm-up, the clock stopped after
  torch.cuda.synchronize().

    python bench/step_syncs.py [--steps 300] [--batch 64 512] [--sync-steps 20] [--out F.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from gan.ema import GeneratorEMA
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, adam, to_floats, train_step
from pipeline.config import load_params
from pipeline.data import PreparedSplit, RankLoader
from pipeline.prepare import prepare
from pipeline.training.loop import build_models, step_config

OPTIMIZERS = {
    "fused Adam (skips on the device)": adam,
    "plain Adam (host fallback)": lambda p, lr, betas: torch.optim.Adam(p, lr, betas=betas),
}
PRECISIONS = {"fp32": "off", "bf16": "bf16"}


def setup(params, batch: int, precision: str, optimizer, device: torch.device):
    """State, batches, step config and sampler for one arm."""
    params = params.model_copy(
        update={"train": params.train.model_copy(
            update={"batch_size": batch, "mixed_precision": PRECISIONS[precision]})}
    )  # fmt: skip
    t = params.train
    split = PreparedSplit(params.prepare.out_dir, "train")
    torch.manual_seed(t.seed)
    g, d = (m.to(device) for m in build_models(params, split.shape, 0))
    betas = (t.beta1, t.beta2)
    state = GANTrainState(
        g, d, optimizer(g.parameters(), t.lr_g, betas), optimizer(d.parameters(), t.lr_d, betas),
        GeneratorEMA(g, t.ema_kimg * 1000, t.batch_size, t.ema_rampup),
    )  # fmt: skip
    batches = RankLoader(split, batch, seed=t.seed, device=device).forever()
    return state, batches, step_config(params, device), LatentSampler(params.model.z_dim), t


def count_syncs(params, device, batch: int, steps: int) -> dict:
    """Host synchronisations per step (and per report) with the fused Adam, fp32."""
    state, batches, cfg, sampler, t = setup(params, batch, "fp32", adam, device)
    for step in range(3):  # warm-up: lazy optimiser state, cuDNN autotuning
        train_step(state, batches, cfg, sampler, step_generator(t.seed, 0, step), step)
    torch.cuda.synchronize()
    where: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(3, 3 + steps):
                metrics = train_step(
                    state, batches, cfg, sampler, step_generator(t.seed, 0, step), step
                )
            in_steps = len(caught)
            state.divergence.raise_if_diverged()
            to_floats(metrics)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return {
        "batch": batch,
        "steps": steps,
        "syncs_per_step": in_steps / steps,
        "syncs_per_report": len(caught) - in_steps,
        "where": dict(where.most_common()),
    }


def rate(params, device, batch: int, precision: str, optimizer, steps: int) -> float:
    state, batches, cfg, sampler, t = setup(params, batch, precision, optimizer, device)
    for step in range(10):
        train_step(state, batches, cfg, sampler, step_generator(t.seed, 0, step), step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(10, 10 + steps):
        train_step(state, batches, cfg, sampler, step_generator(t.seed, 0, step), step)
    state.divergence.raise_if_diverged()  # what a report does (and it waits for the device)
    torch.cuda.synchronize()
    return steps * batch * t.n_critic / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, nargs="*", default=[64, 512])
    parser.add_argument("--sync-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "step_syncs: no CUDA device here; this benchmark counts CUDA host synchronisations "
            "and needs a GPU (run it on the device machine)"
        )
    device = torch.device("cuda", 0)
    figures: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory(prefix="step-syncs-") as tmp:
        params = load_params(
            "params.yaml", [f"prepare.out_dir={tmp}/prepared", f"train.out_dir={tmp}/out"]
        )
        prepare(params, progress=False)
        figures["syncs"] = [count_syncs(params, device, b, args.sync_steps) for b in args.batch]
        for row in figures["syncs"]:
            print(json.dumps(row), flush=True)
        figures["rates"] = []
        for batch in args.batch:
            for precision in PRECISIONS:
                for name, optimizer in OPTIMIZERS.items():
                    images_per_s = rate(params, device, batch, precision, optimizer, args.steps)
                    row = {"batch": batch, "precision": precision, "optimizer": name,
                           "images_per_s": round(images_per_s, 1)}  # fmt: skip
                    figures["rates"].append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
