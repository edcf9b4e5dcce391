"""What caching the real images' features saves when scoring a second candidate.

Scores one set of generated images against the real digits train split twice per feature
extractor: with an empty cache (real features computed) and with the cache the first call
wrote (real features loaded). Prints seconds and the cold/warm ratio for
- domain:    the featurenet (trained here for a few epochs on 16x16 digits)
- inception: torch-fidelity's Inception-v3 with random weights of the right shapes (timing
             only; ~10 images/s on CPU, so --inception-real caps the real images it sees)

    python bench/evaluate_cache.py [--samples 500] [--inception-real 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.featurenet import train_featurenet
from pipeline.fidelity import (
    FEATURENET,
    INCEPTION,
    compute,
    generated_images,
    real_images,
    save_random_inception_weights,
)
from pipeline.prepare import prepare


def cold_and_warm(
    generated, real, extractor: str, weights: str, cache: Path
) -> tuple[float, float]:
    times = []
    for _ in range(2):
        tick = time.perf_counter()
        compute(
            generated, real, extractor=extractor, weights=weights, metrics=("fid", "kid"),
            real_cache_name="bench-real", cache_dir=str(cache), seed=0, batch_size=64,
            kid_subset_size=min(100, len(generated), len(real)), kid_subsets=10,
        )  # fmt: skip
        times.append(time.perf_counter() - tick)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500, help="generated images scored")
    parser.add_argument("--inception-real", type=int, default=200, help="real images (Inception)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = validate_params({
            "prepare": {"out_dir": str(root / "prepared")},
            "featurenet": {"epochs": 3, "min_skill": 0.0, "out_dir": str(root / "fn"),
                           "metrics_file": str(root / "fn.json")},
        })  # fmt: skip
        prepare(params, progress=False)
        train_featurenet(params)
        pixels, _ = PreparedSplit(root / "prepared", "train").read()
        fake = generated_images(torch.rand(args.samples, 1, 16, 16) * 2 - 1)
        weights = root / "inception.pth"
        save_random_inception_weights(weights)
        runs = {
            "domain": (real_images(pixels), FEATURENET, str(root / "fn")),
            "inception": (real_images(pixels[: args.inception_real]), INCEPTION, str(weights)),
        }
        print(f"{args.samples} generated images; real: digits train split 16x16")
        for name, (real, extractor, path) in runs.items():
            generated = fake if name == "domain" else generated_images(
                torch.rand(min(args.samples, args.inception_real), 1, 16, 16) * 2 - 1
            )  # fmt: skip
            cold, warm = cold_and_warm(generated, real, extractor, path, root / f"cache-{name}")
            print(
                f"{name:10s} real images {len(real):5d}: cold cache {cold:7.2f} s, "
                f"warm cache {warm:7.2f} s, cold/warm {cold / warm:5.1f}x"
            )


if __name__ == "__main__":
    main()
