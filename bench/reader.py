"""Reader throughput against in-memory images and against what a DCGAN step consumes.

For 32x32x1 and 32x32x3, on one core (one torch thread): images/s of
- reader:   pipeline.data.RankLoader over prepared Parquet shards (read, gather, -> float)
- memory:   the same images already in memory as a uint8 numpy array (gather, -> float)
- dcgan:    real images a DCGAN-32 training step consumes (ngf=ndf=64, batch 64, hinge)
Each figure is the best of 3 timed runs after a warm-up run.
and the ratios reader/memory and reader/dcgan (target: reader >= 20x dcgan).
With --ray-data, also Ray Data's read_parquet + iter_batches with the same decoding.

    python bench/reader.py [--images 20000] [--ray-data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, StepConfig, train_step
from pipeline.data import PreparedSplit, RankLoader, rank_rows, to_float
from pipeline.shards import write_prepared

BATCH = 64


def make_dataset(root: Path, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
    items = (("train", image, i % 10) for i, image in enumerate(images))
    write_prepared(items, root, shape, 2048, {"source": "bench", "class_names": []})
    return images


def per_second(count: int, fn, repeats: int = 3) -> float:
    """Best of `repeats` timed calls after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def reader_rate(split: PreparedSplit, world_size: int) -> float:
    loader = RankLoader(split, BATCH, rank=0, world_size=world_size)
    return per_second(len(loader) * BATCH, lambda: sum(1 for _ in loader.epoch(1)))


def memory_rate(images: np.ndarray) -> float:
    def epoch():
        rows = rank_rows(len(images), 0, 1, 0, 1)
        for i in range(len(rows) // BATCH):
            to_float(images[rows[i * BATCH : (i + 1) * BATCH]])

    return per_second(len(images) // BATCH * BATCH, epoch)


def dcgan_rate(channels: int, steps: int = 4) -> float:
    torch.manual_seed(0)
    g = build_generator("dcgan", channels=channels, resolution=32, z_dim=100, width=64)
    d = build_discriminator(
        "dcgan", channels=channels, resolution=32, width=64, norm="batch", spectral_norm=False
    )
    state = GANTrainState(g, d, torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters()))
    batches = iter(lambda: (torch.rand(BATCH, channels, 32, 32) * 2 - 1, None), None)
    cfg, sampler = StepConfig(loss="hinge"), LatentSampler(100)
    return per_second(
        steps * BATCH,
        lambda: [
            train_step(state, batches, cfg, sampler, step_generator(0, 0, s), s)
            for s in range(steps)
        ],
    )


def ray_data_rate(root: Path, shape: tuple[int, int, int]) -> tuple[float, float]:
    """(first epoch, second epoch) images/s through Ray Data with the same decoding."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray.data.read_parquet(str(root / "train"))
        size = int(np.prod(shape))

        def epoch():
            count = 0
            for batch in dataset.iter_batches(batch_size=BATCH, batch_format="pyarrow"):
                column = batch.column("image").combine_chunks()
                pixels = np.frombuffer(
                    column.buffers()[1], np.uint8, len(column) * size, column.offset * size
                )
                to_float(pixels.reshape(len(column), *shape))
                count += len(column)
            return count

        rates = []
        for _ in range(2):
            start = time.perf_counter()
            count = epoch()
            rates.append(count / (time.perf_counter() - start))
        return rates[0], rates[1]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--ray-data", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"images={args.images} batch={BATCH} torch threads={torch.get_num_threads()}")
    header = ("shape", "reader", "reader 1/2", "memory", "dcgan", "reader/mem", "reader/dcgan")
    print("{:>9} {:>10} {:>10} {:>10} {:>8} {:>10} {:>12}".format(*header))
    for channels in (1, 3):
        shape = (32, 32, channels)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "prepared"
            images = make_dataset(root, args.images, shape)
            split = PreparedSplit(root, "train")
            reader, half, memory = reader_rate(split, 1), reader_rate(split, 2), memory_rate(images)
            dcgan = dcgan_rate(channels)
            print(
                f"{f'32x32x{channels}':>9} {reader:>10,.0f} {half:>10,.0f} {memory:>10,.0f} "
                f"{dcgan:>8,.0f} {reader / memory:>10.2f} {reader / dcgan:>12.0f}"
            )
            if args.ray_data:
                first, second = ray_data_rate(root, shape)
                print(f"{'':>9} ray data: first epoch {first:,.0f}/s, second {second:,.0f}/s")
    print("reader 1/2: one rank of two (it reads every shard, keeps half its rows)")


if __name__ == "__main__":
    main()
