"""The train stage's outputs in train.out_dir, written by one writer for single runs and sweeps:
result.json, metrics.json (DVC metrics), candidates/<run>, the (best) run's history and sample
grid, best_params.yaml; each replacing its earlier version only once all are written, and only
entries ganpipe wrote."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from pipeline.artifacts import (
    BEST_PARAMS,
    CANDIDATES,
    HISTORY,
    RESULT,
    TRAIN_METRICS,
    TRAIN_OUT_DIR_KEY,
    TRAIN_OUTPUTS,
    TRAIN_SAMPLES,
    TRAIN_STAGE,
    earlier_train_outputs,
)
from pipeline.config import Params
from pipeline.files import check_output_dir, replace_entries, staging_dir, write_json
from pipeline.metrics_files import train_metrics
from pipeline.params_yaml import dump_yaml

# A candidate's checkpoint as a local directory for the time of a copy.
LocalCheckpoint = Callable[[], AbstractContextManager[str | Path]]


def check_train_outputs(params: Params) -> None:
    """Refuse, before any work, a train.out_dir whose entries of our names ganpipe did not
    write (a user's own samples.png would otherwise be replaced at the end)."""
    check_output_dir(
        params.train.out_dir, TRAIN_STAGE, TRAIN_OUT_DIR_KEY, names=TRAIN_OUTPUTS,
        recognise=earlier_train_outputs,
    )  # fmt: skip


def write_train_outputs(
    out: Path, result: dict, checkpoints: list[LocalCheckpoint], best_params: dict | None
) -> None:
    """result.json and metrics.json; candidates/<name> from each of `checkpoints` (in the order
    of result's candidates; the first, the best, also gives history.csv and samples.png);
    best_params.yaml from `best_params` (a params tree without `sweep`) when there is one."""
    staging = staging_dir(out)
    try:
        (staging / CANDIDATES).mkdir()
        pairs = zip(result["candidates"], checkpoints, strict=True)
        for rank, (candidate, local) in enumerate(pairs):
            with local() as directory:
                shutil.copytree(directory, staging / candidate["checkpoint"])
                for name in (HISTORY, TRAIN_SAMPLES) if rank == 0 else ():
                    if (Path(directory) / name).is_file():
                        shutil.copy(Path(directory) / name, staging / name)
        if best_params is not None:
            (staging / BEST_PARAMS).write_text(dump_yaml(best_params))
        write_json(staging / RESULT, result)
        write_json(staging / TRAIN_METRICS, train_metrics(result))
        replace_entries(staging, out, TRAIN_STAGE, TRAIN_OUT_DIR_KEY, earlier_train_outputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
