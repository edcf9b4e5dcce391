"""How stages write their outputs and read each other's: atomic file and directory replacement,
so a failed or interrupted stage leaves the previous outputs (or nothing), never a half-written
file or directory; and `read_stage_json`, which turns a stage's JSON output that is missing or
damaged into an error that names the file and the stage to re-run.

Ownership: a stage replaces only what it wrote. Every directory a stage writes into holds
OWNER_FILE, a JSON record of the entries ganpipe wrote there and which stage wrote each:

    {"format": "ganpipe.output.v1", "entries": {"manifest.json": "prepare", "train": ...}}

Before anything is replaced, each entry that would be deleted must be listed there (or be
recognised by the stage as its own, e.g. the prepare stage's manifest from before markers);
otherwise the stage refuses with OutputError naming the entries, and nothing is touched. So
`prepare.out_dir: /home/me` cannot delete /home/me/thesis.txt. DVC deleting a stage's declared
outputs before running it is unaffected: those are the stage's own.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

OWNER_FILE = ".ganpipe-output"
OWNER_FORMAT = "ganpipe.output.v1"
MAX_LISTED = 5

# Entries of a directory that a stage recognises as its own without OWNER_FILE (outputs
# written before markers existed).
Recognise = Callable[[Path], Iterable[str]]


class OutputError(ValueError):
    """An output path holds something the stage did not write; the message names it."""


def staging_dir(target: str | Path) -> Path:
    """A new empty directory beside `target` (same filesystem, so renames are atomic)."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def read_owners(directory: Path) -> dict[str, str | None]:
    """Entry name -> the stage that wrote it (None: some stage), from `directory`'s OWNER_FILE;
    empty when there is none or it is unreadable (then nothing there counts as ganpipe's)."""
    try:
        record = json.loads((Path(directory) / OWNER_FILE).read_text())
        entries = record["entries"]
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    if record.get("format") != OWNER_FORMAT or not isinstance(entries, dict):
        return {}
    return {str(k): v if isinstance(v, str) else None for k, v in entries.items()}


def _write_owners(directory: Path, owners: dict[str, str | None]) -> None:
    write_json(
        directory / OWNER_FILE, {"format": OWNER_FORMAT, "entries": dict(sorted(owners.items()))}
    )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def check_output_dir(
    target: str | Path,
    stage: str | None = None,
    setting: str | None = None,
    names: Iterable[str] | None = None,
    recognise: Recognise | None = None,
) -> None:
    """Refuse (OutputError) unless writing `stage`'s output to `target` deletes only what a
    ganpipe stage wrote there: with `names`, only those entries are replaced (the others stay);
    without, the whole directory is. `setting` (e.g. "prepare.out_dir") names the key to change.
    Stages call it before their work too, so that a refusal costs nothing."""
    target = Path(target)
    where = f"{setting} {target}" if setting else f"the output directory {target}"
    fix = f"choose a new or empty directory for {setting}" if setting else "choose another one"
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{where} is a file, not a directory: {fix}")
    present = {entry.name for entry in target.iterdir()} - {OWNER_FILE}
    at_stake = sorted(present if names is None else present & set(names))
    if not at_stake:
        return
    owners = read_owners(target)
    if recognise is not None and not owners:
        owners = {name: stage for name in recognise(target)}
    foreign = [n for n in at_stake if n not in owners]
    by_other = [
        n for n in at_stake if n in owners and None not in (stage, owners[n]) and owners[n] != stage
    ]
    if foreign:
        who = f"the {stage} stage" if stage else "ganpipe"
        whole = (
            "replaces its output directory as a whole" if names is None else "would replace them"
        )
        raise OutputError(
            f"{where} holds {_listed(foreign)}, which {who} did not write"
            f"{' there' if names is not None else ''} (no {OWNER_FILE} lists them); the stage "
            f"{whole}, so it refuses rather than delete them: {fix}, or move them away"
        )
    if by_other:
        others = ", ".join(sorted({str(owners[n]) for n in by_other}))
        raise OutputError(
            f"{where} holds {_listed(by_other)}, written by the {others} stage; the {stage} "
            f"stage would delete them: {fix}"
        )


def replace_dir(
    new: Path,
    target: Path,
    stage: str | None = None,
    setting: str | None = None,
    recognise: Recognise | None = None,
) -> None:
    """Put `new` where `target` is, keeping `target` until `new` is in place. With `stage`,
    `target` must be absent, empty or written by that stage (check_output_dir), and `new` gets
    an OWNER_FILE recording it as the stage's."""
    if stage is not None:
        check_output_dir(target, stage, setting, recognise=recognise)
        _write_owners(
            new, {entry.name: stage for entry in new.iterdir() if entry.name != OWNER_FILE}
        )
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


def replace_entries(
    staging: Path,
    target: Path,
    stage: str | None = None,
    setting: str | None = None,
    recognise: Recognise | None = None,
) -> None:
    """Move every file and directory of `staging` into `target`, each replacing its
    namesake; other entries of `target` (DVC's .gitignore, a user's files) stay. A namesake
    that ganpipe did not write there is refused (check_output_dir) before anything moves.
    `target`'s OWNER_FILE records what was written; `staging` is removed."""
    entries = sorted(entry.name for entry in staging.iterdir())
    check_output_dir(target, stage, setting, names=entries, recognise=recognise)
    target.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in read_owners(target).items() if (target / k).exists()}
    _write_owners(target, kept | {name: stage for name in entries})
    for name in entries:
        entry = staging / name
        if entry.is_dir():
            replace_dir(entry, target / name)
        else:
            entry.replace(target / name)
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
