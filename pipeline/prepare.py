"""The `prepare` stage: the configured source -> verified, sharded Parquet (pipeline.shards)."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from gan.tasks import task_for
from pipeline.config import Params
from pipeline.data import check_data_for_task
from pipeline.shards import check_out_dir, write_prepared
from pipeline.sources import BACKGROUND, check_split_sizes, load_source

MAX_LISTED_SKIPS = 20
log = logging.getLogger(__name__)


def prepare(params: Params, progress: bool = True) -> dict:
    """Prepare `params.prepare.source` into `params.prepare.out_dir`; return the manifest."""
    p = params.prepare
    check_out_dir(Path(p.out_dir))  # before any work: an output path it may not replace
    source = load_source(p)

    def finish(manifest: dict) -> None:
        manifest["skipped_files"] = {
            "count": len(source.skipped),
            "first": source.skipped[:MAX_LISTED_SKIPS],
        }
        manifest["transparent_files"] = {
            "count": len(source.transparent),
            "first": source.transparent[:MAX_LISTED_SKIPS],
            "background": BACKGROUND,
        }
        synthetic = source.synthetic_record()
        if synthetic is not None:
            manifest["synthetic"] = synthetic
        rows = {name: split["rows"] for name, split in manifest["splits"].items()}
        check_split_sizes(rows, p, skipped=len(source.skipped))
        check_data_for_task(manifest, task_for(params.model.conditional))
        _note(manifest, params)

    items = tqdm(
        source.items,
        total=sum(source.splits.values()),
        desc=f"prepare {p.source}",
        unit="img",
        disable=not progress,
    )
    describe = {
        "source": p.source,
        "params": p.model_dump(mode="json"),
        "class_names": source.class_names,
        # what each row carries besides its image (gan.tasks): labels, when the data has classes
        "task": task_for(bool(source.class_names)).name,
    }
    shape = (p.resolution, p.resolution, p.channels)
    return write_prepared(items, Path(p.out_dir), shape, p.shard_rows, describe, finish)


def _note(manifest: dict, params: Params) -> None:
    """Say what the user should know now rather than find out in a later stage."""
    transparent = manifest["transparent_files"]["count"]
    if transparent:
        log.warning(
            "prepare: %d image(s) had transparency and were composited on a %s background "
            "(listed in the manifest's transparent_files)",
            transparent,
            BACKGROUND,
        )
    synthetic = manifest.get("synthetic")
    if synthetic:
        log.warning(
            "prepare: %s of the images were written by `ganpipe synthesize` (rows per split: "
            "%s; manifest: synthetic): evaluate compares generators with evaluate.split %r",
            sum(synthetic["rows"].values()),
            synthetic["rows"],
            params.evaluate.split,
        )
    train = manifest["splits"]["train"]["rows"]
    if train < params.global_batch_size:
        log.warning(
            "prepare: the train split has %d images, fewer than one global batch "
            "(train.batch_size %d x ray.num_workers %d = %d), and every training step takes "
            "a full batch: add images or lower train.batch_size",
            train,
            params.train.batch_size,
            params.ray.num_workers,
            params.global_batch_size,
        )
