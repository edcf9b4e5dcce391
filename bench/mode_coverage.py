"""Mode coverage of the MLP GAN on the 2-D test bed, per loss and regularizer.

Prints, per setup: modes covered and high-quality share (mean and worst over seeds), and the
CPU seconds per run (one thread per run). The setups differ from gan.toy.ToyGANConfig's
default (WGAN-GP) only in the fields shown.

    python bench/mode_coverage.py --seeds 0 1 2 --mixture ring
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import time

import torch

from gan.toy import ToyGANConfig, train_toy_gan

SETUPS = {
    "wasserstein + GP (default)": {},
    "hinge + spectral norm": dict(
        loss="hinge", gp_weight=0.0, spectral_norm=True, betas=(0.0, 0.9)
    ),
    "bce (non-saturating)": dict(loss="bce", gp_weight=0.0),
    "bce + R1": dict(loss="bce", gp_weight=0.0, r1_gamma=0.1),
    "lsgan": dict(loss="lsgan", gp_weight=0.0),
    "wasserstein, no constraint": dict(gp_weight=0.0),
    "hinge + SN, lr 3e-3": dict(
        loss="hinge", gp_weight=0.0, spectral_norm=True, betas=(0.0, 0.9), lr_g=3e-3, lr_d=3e-3
    ),
}


def _run(job: tuple[str, ToyGANConfig]) -> tuple[str, dict, float]:
    torch.set_num_threads(1)
    name, cfg = job
    start = time.process_time()
    report = train_toy_gan(cfg)
    return name, report["coverage"], time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mixture", choices=["ring", "grid"], default="ring")
    parser.add_argument("--steps", type=int, default=ToyGANConfig().steps)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="setup names to run (default: all)")
    args = parser.parse_args()
    setups = {k: v for k, v in SETUPS.items() if not args.only or k in args.only}
    jobs = [
        (
            name,
            dataclasses.replace(
                ToyGANConfig(), mixture=args.mixture, seed=seed, steps=args.steps, **overrides
            ),
        )
        for name, overrides in setups.items()
        for seed in args.seeds
    ]
    with mp.get_context("spawn").Pool(args.processes) as pool:
        results = pool.map(_run, jobs)
    print(f"mixture={args.mixture} seeds={args.seeds} steps={args.steps}")
    header = ("setup", "modes mean", "modes min", "HQ mean", "HQ min", "cpu s")
    print("{:30} {:>10} {:>9} {:>8} {:>7} {:>6}".format(*header))
    for name in setups:
        rows = [(c, s) for n, c, s in results if n == name]
        modes = [c["modes_covered"] for c, _ in rows]
        hq = [c["high_quality_share"] for c, _ in rows]
        secs = sum(s for _, s in rows) / len(rows)
        total = rows[0][0]["num_modes"]
        print(
            f"{name:30} {sum(modes) / len(modes):>7.1f}/{total:<2} {min(modes):>6}/{total:<2}"
            f" {sum(hq) / len(hq):>8.3f} {min(hq):>7.3f} {secs:>6.1f}"
        )


if __name__ == "__main__":
    main()
