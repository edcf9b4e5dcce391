"""The prepared-data format: sharded Parquet with a manifest of checksums.

Layout under `prepare.out_dir`:
    <split>/part-NNNNN.parquet   columns: image fixed_size_binary(H*W*C) (uint8, HWC order),
                                 label int16 (-1: unlabeled); zstd; shape in the schema metadata
    manifest.json                source and params, counts per split and class, shape, class
                                 names, each shard's rows and sha256, and `dataset_hash`

    .ganpipe-output              what the prepare stage wrote here (pipeline.files)

`dataset_hash` is a hash of the content (pixels, labels, shape, class names), not of the Parquet
bytes, so it names the dataset version independently of the pyarrow that wrote it. Everything
is written into a temporary sibling directory and renamed into place at the end: an interrupted
or failed preparation leaves the previous output intact (or nothing), never a half-written
shard. The rename replaces only a directory the prepare stage wrote (or an empty one).

Readers trust nothing in the manifest blindly: its structure is checked key by key, a shard
path must stay inside the prepared directory, and verification checks every label against the
class names (a label past them would index past a conditional model's classes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gan.export import sha256_file
from gan.tasks import TASKS
from pipeline.artifacts import read_stage_json
from pipeline.errors import DataError
from pipeline.files import check_output_dir, replace_dir

FORMAT = "ganpipe.images.v1"
MANIFEST = "manifest.json"
IMAGE, LABEL = "image", "label"
REPAIR_HINT = "re-run `dvc repro prepare` (or `dvc checkout` to restore the tracked version)"
STAGE, OUT_DIR_KEY = "prepare", "prepare.out_dir"


def shard_schema(shape: tuple[int, int, int]) -> pa.Schema:
    """The schema of every shard: enough metadata to read pixels back without guessing."""
    metadata = {
        "ganpipe.format": FORMAT,
        "ganpipe.shape": json.dumps(list(shape)),
        "ganpipe.layout": "uint8 HWC",
    }
    fields = [
        pa.field(IMAGE, pa.binary(int(np.prod(shape))), nullable=False),
        pa.field(LABEL, pa.int16(), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, schema: pa.Schema) -> None:
    """One shard: uint8 images (N, H, W, C) and their labels, in the shard schema."""
    column = pa.FixedSizeBinaryArray.from_buffers(
        schema.field(IMAGE).type, len(images), [None, pa.py_buffer(images.tobytes())]
    )
    table = pa.Table.from_arrays([column, pa.array(labels, pa.int16())], schema=schema)
    pq.write_table(table, path, compression="zstd")


class SplitSummary:
    """A split's manifest entry, built shard by shard in order: rows, class counts, each
    shard's sha256 and the content hash of its pixels and labels."""

    def __init__(self, split: str):
        self.split = split
        self.shards: list[dict] = []
        self.class_counts: dict[int, int] = {}
        self.pixel_hash, self.label_hash = hashlib.sha256(), hashlib.sha256()

    def record(self, path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        """Account for the shard at `path` (in the split's directory) holding these rows."""
        self.pixel_hash.update(np.ascontiguousarray(images).tobytes())
        self.label_hash.update(labels.astype("<i2").tobytes())
        for label, count in zip(*np.unique(labels, return_counts=True), strict=True):
            self.class_counts[int(label)] = self.class_counts.get(int(label), 0) + int(count)
        relative = f"{self.split}/{path.name}"
        self.shards.append({"path": relative, "rows": len(labels), "sha256": sha256_file(path)})

    def summary(self) -> dict:
        return {
            "rows": sum(s["rows"] for s in self.shards),
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
            # independent of shard boundaries: pixels and labels are hashed as two streams
            "content_sha256": hashlib.sha256(
                (self.pixel_hash.hexdigest() + self.label_hash.hexdigest()).encode()
            ).hexdigest(),
            "shards": self.shards,
        }


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class SplitWriter(SplitSummary):
    """Buffers one split's images and writes a shard every `shard_rows` images."""

    def __init__(self, root: Path, split: str, shape: tuple[int, int, int], shard_rows: int):
        super().__init__(split)
        self.dir = root / split
        self.dir.mkdir(parents=True)
        self.schema = shard_schema(shape)
        self.images = np.empty((shard_rows, *shape), dtype=np.uint8)
        self.labels = np.empty(shard_rows, dtype=np.int16)
        self.filled = 0

    def add(self, image: np.ndarray, label: int) -> None:
        self.images[self.filled] = image
        self.labels[self.filled] = label
        self.filled += 1
        if self.filled == len(self.images):
            self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        images, labels = self.images[: self.filled], self.labels[: self.filled]
        path = self.dir / shard_name(len(self.shards))
        write_shard(path, images, labels, self.schema)
        self.record(path, images, labels)
        self.filled = 0


def prepared_entries(out_dir: Path) -> list[str]:
    """What a prepare stage wrote in `out_dir` according to its manifest (outputs from before
    pipeline.files' ownership markers): the manifest and its splits' directories."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
        splits = list(manifest["splits"]) if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        splits = None
    return [] if splits is None else [MANIFEST, *map(str, splits)]


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that holds what the prepare stage did not write."""
    check_output_dir(out_dir, STAGE, OUT_DIR_KEY, recognise=prepared_entries)


def _clean_stale(out_dir: Path) -> None:
    """Remove temporary directories left by an interrupted earlier run."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_prepared(
    items: Iterable[tuple[str, np.ndarray, int]],
    out_dir: Path,
    shape: tuple[int, int, int],
    shard_rows: int,
    describe: dict,
    finish=None,
) -> dict:
    """Write (split, image, label) items as shards plus manifest, atomically.

    `describe` goes into the manifest as is (source, params, class names); `finish`, called with
    the manifest after every item is written and before anything is renamed into place, may add
    to it or raise to abandon the output.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        writers: dict[str, SplitWriter] = {}
        for split, image, label in items:
            if split not in writers:
                writers[split] = SplitWriter(tmp, split, shape, shard_rows)
            writers[split].add(image, label)
        for writer in writers.values():
            writer.flush()
        splits = {name: w.summary() for name, w in sorted(writers.items())}
        manifest = new_manifest(describe, shape, splits)
        if finish is not None:
            finish(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir, STAGE, OUT_DIR_KEY, recognise=prepared_entries)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def new_manifest(describe: dict, shape: tuple[int, int, int], splits: dict[str, dict]) -> dict:
    """A manifest: `describe` (source, params, class names, ...), the shape, the splits'
    summaries (SplitSummary.summary) and the dataset hash over all of it."""
    manifest = {"format": FORMAT, **describe, "shape": list(shape), "splits": splits}
    manifest["dataset_hash"] = _dataset_hash(manifest)
    return manifest


def _dataset_hash(manifest: dict) -> str:
    content = {
        "shape": manifest["shape"],
        "class_names": manifest.get("class_names", []),
        "splits": {k: v["content_sha256"] for k, v in manifest["splits"].items()},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: Path) -> dict:
    """The manifest of the prepared data in `out_dir`, its structure checked (DataError)."""
    path = Path(out_dir) / MANIFEST
    manifest = read_stage_json(path, STAGE, DataError)
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}: {REPAIR_HINT}"
        )
    _check_structure(manifest, path)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_shape(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_count(x) and x for x in value)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _is_counts(value) -> bool:
    return isinstance(value, dict) and all(map(_is_count, value.values()))


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value)


def _inside(value) -> bool:
    """A relative path that cannot leave the directory it is relative to (checked on the
    text, not resolved, so shards that DVC links from its cache still count as inside)."""
    if not isinstance(value, str) or not value or "\\" in value:
        return False
    parts = PurePosixPath(value).parts
    return not PurePosixPath(value).is_absolute() and ".." not in parts and parts != (".",)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# key -> (check, what it must be, optional), for the manifest, each split and each shard
MANIFEST_KEYS = {
    "shape": (_is_shape, "[height, width, channels] (positive integers)", False),
    "class_names": (_is_names, "a list of strings", True),
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}", True),
    # images written by `ganpipe synthesize`: rows per split and where they came from
    "synthetic": (lambda v: isinstance(v, dict), "an object (rows, sources)", True),
    "dataset_hash": (_is_text, "a string", False),
    "splits": (lambda v: isinstance(v, dict), "an object of splits", False),
}
SPLIT_KEYS = {
    "rows": (_is_count, "a count", False),
    "class_counts": (_is_counts, "an object of counts", True),
    "shards": (lambda v: isinstance(v, list), "a list of shards", False),
}
SHARD_KEYS = {
    "path": (
        _inside,
        "a relative path inside the prepared directory (a path outside it is never opened)",
        False,
    ),
    "rows": (_is_count, "a count", False),
    "sha256": (_is_sha256, "a sha256 (64 hex digits)", False),
}


def _check_keys(container, keys: dict, where: str, path: Path) -> None:
    if not isinstance(container, dict):
        raise DataError(
            f"{path}: {where!r} is {_short(container)}, expected an object: {REPAIR_HINT}"
        )
    for key, (ok, expected, optional) in keys.items():
        if key not in container and optional:
            continue
        at = f"{where}.{key}" if where else key
        got = "is missing" if key not in container else f"is {_short(container[key])}"
        if key not in container or not ok(container[key]):
            raise DataError(f"{path}: {at!r} {got}, expected {expected}: {REPAIR_HINT}")


def _check_structure(manifest: dict, path: Path) -> None:
    """Every key a reader uses, with the type it needs; DataError names the first one wrong."""
    _check_keys(manifest, MANIFEST_KEYS, "", path)
    for name, split in manifest["splits"].items():
        _check_keys(split, SPLIT_KEYS, f"splits.{name}", path)
        for i, shard in enumerate(split["shards"]):
            _check_keys(shard, SHARD_KEYS, f"splits.{name}.shards[{i}]", path)


def check_labels(labels: np.ndarray, class_names: list[str], path: Path) -> None:
    """Labels must name one of `class_names` (0..n-1), or be -1 everywhere when there are none."""
    n = len(class_names)
    bad = labels != -1 if n == 0 else (labels < 0) | (labels >= n)
    if bad.any():
        value = int(labels[np.argmax(bad)])
        allowed = f"{n} classes (0..{n - 1})" if n else "no classes (unlabeled: -1 only)"
        raise DataError(
            f"shard {path} has label {value} ({int(bad.sum())} such row(s)), but {MANIFEST} "
            f"names {allowed}: {REPAIR_HINT}"
        )


def verify_prepared(out_dir: Path, splits: Iterable[str] | None = None) -> dict:
    """Check every shard against the manifest (presence, sha256, schema, rows, labels in
    range); return it."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    expected = shard_schema(tuple(manifest["shape"]))
    class_names = manifest.get("class_names", [])
    for split in splits or manifest["splits"]:
        if split not in manifest["splits"]:
            raise DataError(f"{out_dir / MANIFEST} has no split {split!r}: {REPAIR_HINT}")
        for shard in manifest["splits"][split]["shards"]:
            path = out_dir / shard["path"]
            if not path.is_file():
                raise DataError(f"shard {path} is missing: {REPAIR_HINT}")
            if sha256_file(path) != shard["sha256"]:
                raise DataError(f"shard {path} is damaged (checksum mismatch): {REPAIR_HINT}")
            try:
                metadata = pq.read_metadata(path)
                schema = metadata.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as exc:
                raise DataError(
                    f"shard {path} is not readable Parquet ({exc}): {REPAIR_HINT}"
                ) from None
            if not schema.equals(expected, check_metadata=True):
                raise DataError(
                    f"shard {path} has schema {schema}, expected {expected}: {REPAIR_HINT}"
                )
            if metadata.num_rows != shard["rows"]:
                raise DataError(
                    f"shard {path} has {metadata.num_rows} rows, the manifest says "
                    f"{shard['rows']}: {REPAIR_HINT}"
                )
            labels = pq.read_table(path, columns=[LABEL]).column(LABEL).to_numpy()
            check_labels(labels, class_names, path)
    return manifest
