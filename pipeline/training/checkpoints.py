"""The worker's checkpoint I/O around pipeline.checkpoint: where a checkpoint is written before
Ray uploads it, how a damaged one is skipped on restore, and the history saved with it."""

from __future__ import annotations

import csv
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline.artifacts import HISTORY
from pipeline.checkpoint import CheckpointError, all_damaged_message, load_checkpoint

SCRATCH_PREFIX = "ganpipe-ckpt-"


def restore(checkpoint, modules: dict, optimizers: dict, rank: int):
    """Load Ray's checkpoint of this run, or where it is damaged (cut short by a full disk, a
    killed copy) the newest intact one Ray keeps before it; (TrainingState, history rows)."""
    damaged = []
    for candidate in [checkpoint, *_earlier_checkpoints(checkpoint)]:
        with candidate.as_directory() as directory:
            try:
                saved = load_checkpoint(Path(directory), modules, optimizers)
            except CheckpointError as exc:
                damaged.append(str(exc))
                continue
            history = read_history(Path(directory) / HISTORY)
        if damaged and rank == 0:
            print(
                f"train: skipped damaged checkpoints ({'; '.join(damaged)}); resumed from "
                f"{candidate.path} (step {saved.step})", file=sys.stderr, flush=True,
            )  # fmt: skip
        return saved, history
    raise CheckpointError(all_damaged_message(damaged))


def _earlier_checkpoints(checkpoint) -> list:
    """The other checkpoints of the run in `checkpoint`'s storage, newest first (Ray names
    them checkpoint_<time>)."""
    from pyarrow import fs
    from ray.train import Checkpoint

    parent, _, own = checkpoint.path.rstrip("/").rpartition("/")
    try:
        infos = checkpoint.filesystem.get_file_info(fs.FileSelector(parent))
    except OSError:
        return []
    names = sorted(
        (i.base_name for i in infos if i.type == fs.FileType.Directory
         and i.base_name.startswith("checkpoint_") and i.base_name < own),
        reverse=True,
    )  # fmt: skip
    return [Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in names]


def checkpoint_scratch() -> Path:
    """An empty directory to write a checkpoint into before report() uploads it. Tune kills
    the workers of a trial it stops inside report(), before they can remove theirs, so the
    directory is named after this process and those of processes that are gone are removed
    first: a sweep leaves at most one per live worker in the temp folder."""
    base = Path(tempfile.gettempdir())
    _remove_dead_workers_scratch(base)
    own = base / f"{SCRATCH_PREFIX}{os.getpid()}"
    shutil.rmtree(own, ignore_errors=True)
    return own / "ckpt"


@functools.cache
def _remove_dead_workers_scratch(base: Path) -> None:
    """Once per process and temp folder: not a scan of the folder at every checkpoint."""
    for stale in base.glob(f"{SCRATCH_PREFIX}*"):
        pid = stale.name.removeprefix(SCRATCH_PREFIX)
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def write_history(path: Path, rows: list[dict]) -> None:
    fields = sorted({k for row in rows for k in row if k != "error"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    parse = {"diverged": lambda v: v == "True", "step": int, "resolution": int}
    with open(path, newline="") as f:
        return [{k: parse.get(k, float)(v) for k, v in row.items()} for row in csv.DictReader(f)]
