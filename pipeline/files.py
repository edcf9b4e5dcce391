"""Atomic file and directory replacement, so a failed or interrupted stage leaves the previous
outputs (or nothing), never a half-written file or directory."""

from __future__ import annotations

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
    new.rename(target)
    if old is not None:
        shutil.rmtree(old)


def write_json(path: str | Path, data) -> None:
    """Write JSON so that a reader sees the old file or the new one, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
