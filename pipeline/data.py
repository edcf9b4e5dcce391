"""The reader training, featurenet and evaluation use: rank r of w gets its share of a split.

Why pyarrow and not Ray Data, by measurement (bench/reader.py, 2-core CPU, one thread, 32x32
images): this reader delivers 586k (1 channel) / 279k (3 channels) float images/s; Ray Data's
read_parquet + iter_batches with the same decoding 7k/s in its first epoch and 12-19k/s after,
and it starves (hangs) when Train workers hold every CPU (../shared/STACK_NOTES.md). A DCGAN-32
step consumes about 200 images/s on the same core, so either would feed it, but pyarrow does it
at a thousandth of the cost and with no scheduling trap. A shard read is a zero-copy view of a
fixed-size binary column; the rest is a few numpy operations per shard.

Sharing: every epoch, a seeded permutation of all N rows is dealt out round-robin, rank r
taking positions r, r + w, ... (padded by wrapping around to a multiple of w, as PyTorch's
DistributedSampler does), so the ranks' shares are disjoint, together cover every image, and
every rank gets the same number of batches (a DDP requirement). A rank streams the shards and
keeps only its own rows: memory is its share of uint8 pixels, not the whole split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gan.tasks import Task, get_task, task_for
from pipeline.shards import IMAGE, LABEL, DataError, read_manifest, verify_prepared

Tensor = torch.Tensor


def read_shard(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A shard's pixels as uint8 (n, H, W, C), zero-copy where pyarrow allows, and its labels."""
    table = pq.read_table(path, columns=[IMAGE, LABEL])
    column = table.column(IMAGE).combine_chunks()
    size = int(np.prod(shape))
    pixels = np.frombuffer(
        column.buffers()[1], dtype=np.uint8, count=len(column) * size, offset=column.offset * size
    )
    return pixels.reshape(len(column), *shape), table.column(LABEL).to_numpy().astype(np.int64)


def to_float(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1], converted on `device` (moves 1 byte per value)."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def quantize(images: Tensor) -> Tensor:
    """Generated float images in [-1, 1] (N, C, H, W) as uint8, the way a PNG stores them."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def to_nhwc(images: Tensor) -> np.ndarray:
    """Generated float images in [-1, 1] (N, C, H, W) as uint8 NHWC (what shards hold)."""
    return quantize(images).permute(0, 2, 3, 1).contiguous().numpy()


class PreparedSplit:
    """One verified split of the prepared data, read shard by shard."""

    def __init__(self, out_dir: str | Path, split: str = "train", verify: bool = True):
        self.out_dir = Path(out_dir)
        self.manifest = (
            verify_prepared(self.out_dir, [split]) if verify else read_manifest(self.out_dir)
        )
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.out_dir} has no split {split!r}")
        self.split = split
        self.shape = tuple(self.manifest["shape"])
        self.shards = self.manifest["splits"][split]["shards"]
        self.num_rows = sum(s["rows"] for s in self.shards)
        self.class_names: list[str] = self.manifest.get("class_names", [])
        self.dataset_hash: str = self.manifest["dataset_hash"]

    def read(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels at global row indices `rows` (in that order), or all of them."""
        if rows is None:
            parts = [read_shard(self.out_dir / s["path"], self.shape) for s in self.shards]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        images = np.empty((len(rows), *self.shape), dtype=np.uint8)
        labels = np.empty(len(rows), dtype=np.int64)
        start = 0
        for shard in self.shards:
            stop = start + shard["rows"]
            wanted = np.flatnonzero((rows >= start) & (rows < stop))
            if len(wanted):
                shard_images, shard_labels = read_shard(self.out_dir / shard["path"], self.shape)
                images[wanted] = shard_images[rows[wanted] - start]
                labels[wanted] = shard_labels[rows[wanted] - start]
            start = stop
        return images, labels


def rank_rows(num_rows: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's global row indices for `epoch`: disjoint across ranks, padded by wrapping."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    padded = np.resize(order, -(-num_rows // world_size) * world_size)
    return padded[rank::world_size]


def data_task(manifest: dict) -> Task:
    """The task the prepared data was made for (manifests from before tasks: by its labels)."""
    return get_task(manifest.get("task") or task_for(bool(manifest.get("class_names"))).name)


def check_data_for_task(manifest: dict, task: Task) -> None:
    """The prepared data carries what `task` conditions on: a class-conditional model needs
    labels of at least two classes in the train split."""
    task.check_available()
    missing = [c for c in task.columns if c not in data_task(manifest).columns]
    if missing and task.condition != "label":
        raise DataError(
            f"task {task.name} needs prepared data with {', '.join(missing)} per image; the "
            f"prepared data is for task {data_task(manifest).name}: prepare it for {task.name}"
        )
    if task.condition != "label":
        return
    counts = manifest["splits"].get("train", {}).get("class_counts", {})
    classes = [c for c in counts if int(c) >= 0]
    if len(classes) < 2:
        found = (
            "no labels"
            if not classes
            else f"only class {manifest['class_names'][int(classes[0])]!r}"
        )
        raise DataError(
            f"model.conditional is true but the prepared train split has {found}; a conditional "
            "GAN needs at least two classes (one subfolder per class), or set "
            "model.conditional: false"
        )


def batches_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Full batches each rank yields per epoch (every rank the same number: a DDP need)."""
    return -(-num_rows // world_size) // batch_size


def check_split_fits_batch(manifest: dict, batch_size: int, world_size: int) -> None:
    """Refuse, before any worker or MLflow run starts, a train split without one full batch per
    worker (the workers would fail later, each with a traceback)."""
    rows = manifest["splits"]["train"]["rows"]
    if batches_per_epoch(rows, world_size, batch_size) == 0:
        raise DataError(
            f"the prepared train split has {rows} images: too few for {world_size} worker(s) x "
            f"train.batch_size {batch_size} (each worker needs one full batch); lower "
            "train.batch_size or ray.num_workers, or prepare more images"
        )


class RankLoader:
    """Batches of (float images in [-1, 1], labels or None) for one rank, epoch after epoch.

    Every rank yields len(self) batches per epoch; a last partial batch is dropped so that
    every step has the configured batch size.
    """

    def __init__(
        self,
        data: PreparedSplit,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        labeled: bool = False,
        device: torch.device | str = "cpu",
    ):
        self.data, self.batch_size = data, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.labeled, self.device = labeled, device
        if len(self) == 0:
            raise DataError(
                f"{data.split} split of {data.out_dir} has {data.num_rows} images: too few for "
                f"{world_size} worker(s) x batch_size {batch_size}; lower the batch size"
            )

    def __len__(self) -> int:
        return batches_per_epoch(self.data.num_rows, self.world_size, self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """This rank's batches of `epoch`, from batch `start` on."""
        rows = rank_rows(self.data.num_rows, self.rank, self.world_size, self.seed, epoch)
        images, labels = self.data.read(rows)
        for i in range(start, len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            y = torch.from_numpy(labels[batch]).to(self.device) if self.labeled else None
            yield to_float(images[batch], self.device), y

    def forever(self, epoch: int = 0, skip: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Batches across epochs without end (what gan.step.train_step consumes), starting at
        batch `skip` of `epoch`: a resumed run continues exactly where the checkpoint was."""
        while True:
            yield from self.epoch(epoch, skip)
            epoch, skip = epoch + 1, 0
