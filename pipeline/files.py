"""Atomic file and directory replacement, so a failed or interrupted stage leaves the previous
outputs (or nothing), never a half-written file or directory."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path


def staging_dir(target: str | Path) -> Path:
    """A new empty directory beside `target` (same filesystem, so renames are atomic)."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def replace_dir(new: Path, target: Path) -> None:
    """Put `new` where `target` is, keeping `target` until `new` is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old)


def replace_entries(staging: Path, target: Path) -> None:
    """Move every file and directory of `staging` into `target`, each replacing its
    namesake; other entries of `target` (DVC's .gitignore) stay. `staging` is removed."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        if entry.is_dir():
            replace_dir(entry, target / entry.name)
        else:
            entry.replace(target / entry.name)
    staging.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary path beside `path` to write to; it becomes `path` when the block succeeds
    (a reader sees the old file or the new one, never part of one) and is removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
