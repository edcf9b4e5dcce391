"""The `prepare` stage: the configured source -> verified, sharded Parquet (pipeline.shards)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.config import Params
from pipeline.data import check_labels_for_model
from pipeline.shards import write_prepared
from pipeline.sources import load_source

MAX_LISTED_SKIPS = 20


def prepare(params: Params, progress: bool = True) -> dict:
    """Prepare `params.prepare.source` into `params.prepare.out_dir`; return the manifest."""
    p = params.prepare
    source = load_source(p)

    def finish(manifest: dict) -> None:
        manifest["skipped_files"] = {
            "count": len(source.skipped),
            "first": source.skipped[:MAX_LISTED_SKIPS],
        }
        check_labels_for_model(manifest, params.model.conditional)

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
    }
    shape = (p.resolution, p.resolution, p.channels)
    return write_prepared(items, Path(p.out_dir), shape, p.shard_rows, describe, finish)
