"""What early stopping saves in a sweep: ASHA against the same sweep run to the end.

On the shipped digits setup (DCGAN, 16x16, featurenet-domain FID), 16 trials drawn from
learning rate x loss (seeded, so both sweeps train exactly the same configurations) run twice
with 1-worker trials: FIFO with the instability stopper off except for divergence (the
baseline), then ASHA with the stopper on. Prints, per sweep, the compute spent (trial-steps) and the
best FID any trial reached, and the ratios (target: ASHA within 10% of the baseline's best
FID with at most 40% of its compute).

    python bench/sweep_stopping.py [--steps 600] [--eval-every 50] [--reduction-factor 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.cluster import start_local_ray
from pipeline.config import validate_params
from pipeline.featurenet import train_featurenet
from pipeline.prepare import prepare
from pipeline.training.sweep import sweep

# Drawn at random (seeded: both sweeps run the same 16 configurations in the same order). A
# grid in ascending learning rate would be ASHA's worst case: every new trial beats the ones
# before it at the first rung, so none is stopped there.
SPACE = {
    "train.lr_g": {"type": "loguniform", "low": 3e-5, "high": 1e-2},
    "train.loss": {"type": "choice", "values": ["hinge", "bce"]},
}
TRIALS = 16


def run(root: Path, name: str, steps: int, eval_every: int, **sweep_options) -> dict:
    params = validate_params({
        "prepare": {"out_dir": str(root / "prepared")},
        "train": {"steps": steps, "out_dir": str(root / name / "train")},
        "featurenet": {"out_dir": str(root / "featurenet"),
                       "metrics_file": str(root / "featurenet.json")},
        "evaluate": {"cache_dir": str(root / "cache")},
        "sweep": {"space": SPACE, "num_trials": TRIALS, "top_k": 1, "eval_every": eval_every,
                  "eval_samples": 500, **sweep_options},
        "ray": {"num_workers": 1, "storage_path": str(root / name / "runs")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": name},
    })  # fmt: skip
    if not (root / "featurenet").exists():
        prepare(params, progress=False)
        train_featurenet(params)
    tick = time.perf_counter()
    summary = sweep(params)
    fids = [t["best_fid"] for t in summary["trials"] if t.get("best_fid") is not None]
    return {
        "trial_steps": summary["trial_steps"],
        "best_fid": min(fids),
        "seconds": time.perf_counter() - tick,
        "endings": sorted(t["stop_reason"] for t in summary["trials"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--reduction-factor", type=int, default=3)
    args = parser.parse_args()
    start_local_ray(
        log_to_driver=False
    )  # with the dashboard: sweeps need it (pipeline.training.sweep)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = run(root, "fifo", args.steps, args.eval_every, scheduler="fifo", patience=10**6)
        asha = run(
            root, "asha", args.steps, args.eval_every, scheduler="asha",
            reduction_factor=args.reduction_factor,
        )  # fmt: skip
    for name, figures in (("no stopping (FIFO)", full), ("ASHA + stopper", asha)):
        print(
            f"{name:20s} trial-steps {figures['trial_steps']:6d}  best FID "
            f"{figures['best_fid']:7.2f}  wall {figures['seconds']:6.1f} s  {figures['endings']}"
        )
    print(
        f"{len(full['endings'])} trials, {args.steps} steps, ASHA reduction factor "
        f"{args.reduction_factor}, grace = eval_every = {args.eval_every}"
    )
    print(
        f"ASHA: {asha['trial_steps'] / full['trial_steps']:.0%} of the compute, best FID "
        f"{asha['best_fid'] / full['best_fid'] - 1:+.1%} against no stopping"
    )


if __name__ == "__main__":
    main()
