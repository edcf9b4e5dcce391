"""The CUDA path of the train and evaluate code: it runs, and what it buys over the CPU.

For a machine with a GPU. Runs the real training loop (pipeline.training.loop.train_loop) on digits,
outside Ray, in one process:
- cpu:        fp32 on the CPU cores (the baseline of every ratio)
- cuda fp32:  mixed_precision off, channels_last off
- cuda bf16:  the GPU defaults (bf16 autocast, channels_last)
- cuda DDP:   the GPU defaults inside DistributedDataParallel over NCCL (a world of one:
              the collectives, NCCL set-up and the DDP wrapping the Ray workers use)
- the GAN families at the GPU defaults: conditional DCGAN, WGAN-GP, MLP, ResNet
- batch 512 and torch.compile, to show where a 16x16 DCGAN stops being launch-bound
Each run ends with the sweep's domain FID/KID (TrialEvaluator, on the GPU); the featurenet
is trained on the GPU first, and Inception feature extraction (random weights: a speed
figure, not a score) is timed on 2,000 images.

Ray is not needed: the loop's Ray node census (`_node_ids`) is replaced by a constant, since
Ray itself is not installed where this runs.

    python bench/gpu_path.py [--steps 1000] [--cpu-steps 400] [--only NAME ...]
    python bench/gpu_path.py --steps 300 --cpu-steps 0 \
        --set prepare.resolution=64 train.batch_size=256 --only "cuda fp32" ...
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import pipeline.training.loop as loop_module
from pipeline.cluster import free_port
from pipeline.config import load_params
from pipeline.data import PreparedSplit
from pipeline.featurenet import train_featurenet
from pipeline.fidelity import INCEPTION, real_images, save_random_inception_weights
from pipeline.prepare import prepare
from pipeline.scoring import Scorer, TrialEvaluator, TrialScoring
from pipeline.shards import read_manifest
from pipeline.training.loop import train_loop
from pipeline.training.worker_config import WorkerConfig

OFF = ["train.mixed_precision=off", "train.channels_last=off"]
MLP = ["model.family=mlp", "model.spectral_norm_d=false"]
RUNS = {  # name: (device, DDP, overrides)
    "cpu fp32": ("cpu", False, []),
    "cuda fp32": ("cuda", False, OFF),
    "cuda bf16 (defaults)": ("cuda", False, []),
    "cuda bf16, DDP over NCCL": ("cuda", True, []),
    "cuda conditional dcgan": ("cuda", False, ["model.conditional=true"]),
    "cuda wgan-gp": ("cuda", False, ["train.loss=wasserstein", "train.gp_weight=10"]),
    "cuda mlp": ("cuda", False, MLP),
    "cuda resnet": ("cuda", False, ["model.family=resnet"]),
    "cuda bf16, batch 512": ("cuda", False, ["train.batch_size=512"]),
    "cuda bf16, torch.compile": ("cuda", False, ["train.compile=true"]),
    # which of the two GPU defaults costs or pays, and whether compile needs channels_last off
    "cuda bf16, channels_last off": ("cuda", False, ["train.channels_last=off"]),
    "cuda fp32, channels_last on": ("cuda", False, ["train.mixed_precision=off"]),
    "cuda fp32, batch 512": ("cuda", False, OFF + ["train.batch_size=512"]),
    "cuda fp32, torch.compile": ("cuda", False, OFF + ["train.compile=true"]),
    "cuda bf16, torch.compile, channels_last off": (
        "cuda",
        False,
        ["train.compile=true", "train.channels_last=off"],
    ),
}


class LocalSession:
    """train_loop's session for one process: rank 0 of 1, reports kept in a list."""

    rank, world = 0, 1

    def __init__(self, device: str, ddp: bool):
        self.device = torch.device(device, 0) if device == "cuda" else torch.device(device)
        self.ddp, self.reports = ddp, []

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if not self.ddp:
            return module
        ddp = torch.nn.parallel.DistributedDataParallel
        # forward_sync_buffers is torch >= 2.14's name for broadcast_buffers (train.py's choice)
        sync = "forward_sync_buffers"
        if sync not in inspect.signature(ddp.__init__).parameters:
            sync = "broadcast_buffers"
        return ddp(module, device_ids=[0], find_unused_parameters=False, **{sync: True})

    def checkpoint(self):
        return None

    def report(self, metrics: dict, directory: Path | None = None) -> None:
        self.reports.append({**metrics, "checkpoint": directory is not None})


def run(
    base: Path, name: str, steps: int, scoring: TrialScoring, dataset_hash: str, common
) -> dict:
    device, ddp, overrides = RUNS[name]
    overrides = [*common, *overrides]
    every = ["train.log_every=100"]  # each report runs the FID evaluation
    params = load_params(base / "params.yaml", [f"train.steps={steps}", *every, *overrides])
    session = LocalSession(device, ddp)
    if ddp:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    config = WorkerConfig.build(params, dataset_hash, scoring=scoring)
    start = time.perf_counter()
    try:
        train_loop(config, session)
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        if ddp:
            dist.destroy_process_group()
    wall = time.perf_counter() - start
    last = session.reports[-1]
    first, rates = session.reports[0], [r["images_per_s"] for r in session.reports[1:]]
    rates = rates or [first["images_per_s"]]  # a run of one report: its warm-up is all there is
    images_per_step = params.train.batch_size * params.train.n_critic
    return {
        "run": name,
        "steps": last["step"],
        "images_per_s": round(sorted(rates)[len(rates) // 2], 1),  # median; not the warm-up
        "first_report_s": round(first["step"] * images_per_step / first["images_per_s"], 2),
        "wall_s": round(wall, 1),
        "fid_domain": round(last["fid_domain"], 2),
        "kid_domain": round(last["kid_domain"], 5),
        "eval_s": round(last["eval_seconds"], 2),
        "diverged": last["diverged"],
    }


def inception_rate(base: Path, cache: Path, images: int = 2000) -> dict:
    """Inception-v3 features of `images` digits on this device (random weights: speed only)."""
    weights = base / "inception-random.pth"
    save_random_inception_weights(weights)
    params = load_params(base / "params.yaml")
    pixels, _ = PreparedSplit(params.prepare.out_dir, "train", verify=False).read()
    real = real_images(pixels[:images])
    fake = real.images[:images].float().div(127.5).sub(1)
    extractor = {"name": INCEPTION, "weights": str(weights), "sha256": "random"}
    config = params.evaluate.model_copy(update={"cache_dir": str(cache), "kid_subset_size": 500})
    scorer = Scorer(config, {"inception": extractor}, "bench")
    start = time.perf_counter()
    scorer.score(fake, real, "bench-real", ("fid",))
    seconds = time.perf_counter() - start
    return {"images": 2 * len(real), "seconds": round(seconds, 2),
            "images_per_s": round(2 * len(real) / seconds, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cpu-steps", type=int, default=400, help="0: no CPU baseline")
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--only", nargs="*", help="run only these (the CPU baseline always)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_path: no CUDA device here; this benchmark needs one")
    loop_module._node_ids = lambda: ["local"]  # Ray's node census; Ray is not needed here
    figures: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                     "cpu_threads": torch.get_num_threads(), "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-path-") as tmp:
        base = Path(tmp)
        (base / "params.yaml").write_text(Path("params.yaml").read_text())
        os.chdir(base)  # the params' relative out_dirs land in the temporary directory
        params = load_params(base / "params.yaml", args.set)
        prepare(params, progress=False)
        tick = time.perf_counter()
        figures["featurenet"] = train_featurenet(params) | {
            "stage_s": round(time.perf_counter() - tick, 1)
        }
        manifest = read_manifest(params.prepare.out_dir)
        scoring = TrialScoring.of(params, manifest["dataset_hash"], eval_samples=1000)
        TrialEvaluator(scoring)  # loads the featurenet once: fails here, not in a run
        chosen = [n for n in RUNS if not args.only or n in args.only or RUNS[n][0] == "cpu"]
        for name in chosen:
            steps = args.cpu_steps if RUNS[name][0] == "cpu" else args.steps
            if steps == 0:
                continue
            try:
                row = run(base, name, steps, scoring, manifest["dataset_hash"], args.set)
            except Exception as exc:  # one broken path must not hide the others' figures
                row = {"run": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            figures["runs"].append(row)
            print(json.dumps(row), flush=True)
        figures["inception"] = inception_rate(base, Path(params.evaluate.cache_dir))
    rates = {row["run"]: row.get("images_per_s") for row in figures["runs"]}
    for row in figures["runs"]:
        for baseline in ("cpu fp32", "cuda fp32"):
            if rates.get(baseline) and "images_per_s" in row:
                row[f"vs_{baseline.replace(' ', '_')}"] = round(
                    row["images_per_s"] / rates[baseline], 2
                )
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
