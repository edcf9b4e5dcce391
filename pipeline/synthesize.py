"""`ganpipe synthesize`: a labeled dataset drawn from a generator, as an image folder that
prepare reads back or as prepared Parquet shards, with its provenance, so that a synthetic
dataset is never mistaken for real data.

Labels (one Labeler per task condition, LABELERS):
- conditional generators draw their classes: balanced, or in the proportions `class_weights`
  (counts by largest remainder, the order shuffled by the seed);
- unconditional ones are labeled by a classifier, the featurenet by default (pseudo-labels):
  a sample is kept only when its predicted class has a softmax probability of at least
  `min_confidence`; the rejected share is reported and recorded.

Layout of `out`:
    imagefolder  <class>/<index>.png (prepare.source: imagefolder, image_labels: folders)
    parquet      train/part-NNNNN.parquet + manifest.json: a prepared dataset (pipeline.shards)
                 with a train split only
    both         synthetic.json: model URI and registry version, the digest and weights sha256
                 of what was loaded, seeds, truncation, how labels were made, counts

Every PNG also carries a text chunk PNG_KEY naming the model, so prepare recognises a synthetic
image wherever it is copied, and refuses to mix it with real images unless asked
(prepare.allow_synthetic; pipeline/sources.py). The manifest of a prepared synthetic dataset
has a `synthetic` entry.

Resumable and atomic: images are drawn in chunks of `chunk_size`, chunk c from noise seeded by
mix_seed(seed, c), and written into a staging directory beside `out`
(`.<name>.synthesize-partial`) with a progress record after each chunk. Run again after an
interrupt with the same request, it resumes at the first unfinished chunk (a different
request starts over); `out` appears only once complete, and replaces only an earlier
synthesize output. Memory holds one chunk, whatever `num_images`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from gan.models import GeneratorSpec
from gan.sampling import check_truncation, mix_seed
from gan.tasks import task_for
from pipeline.data import read_shard
from pipeline.errors import SynthesisError
from pipeline.files import check_output_dir, replace_dir, write_json
from pipeline.shards import (
    SplitSummary,
    new_manifest,
    shard_name,
    shard_schema,
    write_shard,
)
from pipeline.sources import PNG_KEY
from pipeline.synthetic import class_counts, draw, pseudo_labels

FORMAT = "ganpipe.synthetic.v1"
FORMATS = ("imagefolder", "parquet")
PROVENANCE = "synthetic.json"
PROGRESS = ".ganpipe-synthesize.json"
STAGE, OUT_KEY = "synthesize", "--out"
MAX_DRAWS_PER_IMAGE = 50  # unconditional: give up when fewer than 1 in 50 samples is kept


@dataclass(frozen=True)
class SynthesisRequest:
    """What to draw and where: everything that decides the images (and so the resume)."""

    model_uri: str
    num_images: int
    out: str
    format: str = "imagefolder"
    seed: int = 0
    truncation: float = 1.0
    class_weights: tuple[float, ...] | None = None  # conditional: None is balanced
    min_confidence: float = 0.9  # unconditional: the pseudo-labels' floor
    featurenet_dir: str = "models/featurenet"  # unconditional: the labeler
    chunk_size: int = 1024
    tracking_uri: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int):
            raise SynthesisError(f"num_images must be an integer, got {self.num_images!r}")
        if self.num_images < 1:
            raise SynthesisError(f"num_images must be at least 1, got {self.num_images}")
        if self.format not in FORMATS:
            raise SynthesisError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        try:
            check_truncation(self.truncation)
        except ValueError as exc:
            raise SynthesisError(str(exc)) from None
        if not 0 <= self.min_confidence < 1:
            raise SynthesisError(
                f"min_confidence must be from 0 to below 1 (a softmax probability), got "
                f"{self.min_confidence}"
            )
        if self.chunk_size < 1:
            raise SynthesisError(f"chunk_size must be at least 1, got {self.chunk_size}")
        weights = self.class_weights
        if weights is not None and (
            not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0
        ):
            raise SynthesisError(
                f"class weights must be finite, non-negative and not all zero, got {weights}"
            )

    def key(self) -> dict:
        """What a resumed run must share with the interrupted one."""
        return {k: v for k, v in asdict(self).items() if k != "tracking_uri"}


class ConditionedLabels:
    """Conditional generators: the label of image i is fixed before drawing (balanced or by
    weights, shuffled by the seed), so every chunk keeps all it draws."""

    source = "conditioning"

    def __init__(self, request: SynthesisRequest, spec: GeneratorSpec, class_names: list[str]):
        weights = request.class_weights or (1.0,) * spec.num_classes
        if len(weights) != spec.num_classes:
            raise SynthesisError(
                f"{len(weights)} class weights given, but {request.model_uri} has "
                f"{spec.num_classes} classes ({', '.join(class_names)})"
            )
        counts = class_counts(request.num_images, list(weights))
        self.labels = np.repeat(np.arange(spec.num_classes, dtype=np.int16), counts)
        np.random.default_rng(request.seed).shuffle(self.labels)
        self.class_names = class_names
        self.record = {"source": self.source, "class_weights": list(weights)}

    def chunk(self, generator, spec, request, index: int, start: int):
        """(images, labels, drawn) of chunk `index`, which starts at image `start`."""
        labels = self.labels[start : start + request.chunk_size]
        seed = mix_seed(request.seed, index)
        images = draw(generator, spec, len(labels), seed, labels, request.truncation)
        return images, labels, len(labels)


class PredictedLabels:
    """Unconditional generators: a chunk draws `chunk_size` samples and keeps those the
    classifier labels confidently (pseudo-labels)."""

    source = "featurenet pseudo-labels"

    def __init__(self, request: SynthesisRequest, spec: GeneratorSpec, class_names: list[str]):
        from pipeline.featurenet import load_featurenet

        try:
            self.net, info = load_featurenet(request.featurenet_dir)
        except ValueError as exc:
            raise SynthesisError(
                f"{request.model_uri} is unconditional, so its samples are labeled by the "
                f"featurenet in {request.featurenet_dir}, which cannot be used: {exc}"
            ) from None
        shape = (info["resolution"], info["channels"])
        if shape != (spec.resolution, spec.channels):
            raise SynthesisError(
                f"the featurenet in {request.featurenet_dir} reads {shape[0]} px images with "
                f"{shape[1]} channel(s), but {request.model_uri} draws {spec.resolution} px with "
                f"{spec.channels}: give the featurenet of the generator's data (--featurenet)"
            )
        self.class_names = info["class_names"]
        self.record = {
            "source": self.source,
            "featurenet_weights_sha256": info["weights_sha256"],
            "featurenet_dataset_hash": info["dataset_hash"],
            "min_confidence": request.min_confidence,
        }

    def chunk(self, generator, spec, request, index: int, start: int):
        images = draw(generator, spec, request.chunk_size, mix_seed(request.seed, index), None,
                      request.truncation)  # fmt: skip
        kept, labels = pseudo_labels(self.net, images, request.min_confidence)
        kept, labels = kept[: request.num_images - start], labels[: request.num_images - start]
        return images[kept], labels.astype(np.int16), request.chunk_size


LABELERS = {"label": ConditionedLabels, "none": PredictedLabels}  # by gan.tasks condition


def folder_names(class_names: list[str]) -> list[str]:
    """A safe, distinct folder name per class: characters other than letters, digits, '-',
    '_', '.' and spaces become '_' (Fashion-MNIST's 'T-shirt/top' -> 'T-shirt_top'), no
    leading dot (prepare skips hidden folders), a suffix where two would clash."""
    names: list[str] = []
    for i, name in enumerate(class_names):
        safe = re.sub(r"[^\w.\- ]", "_", name).lstrip(".") or f"class{i}"
        names.append(safe if safe not in names else f"{safe}_{i}")
    return names


class ImageFolderWriter:
    """<class>/<index>.png, each PNG marked with PNG_KEY."""

    def __init__(self, root: Path, shape, class_names: list[str], mark: dict):
        self.root, self.folders, self.mark = root, folder_names(class_names), mark

    def write(self, index: int, start: int, images: np.ndarray, labels: np.ndarray) -> dict:
        for offset, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            folder = self.root / self.folders[label]
            folder.mkdir(exist_ok=True)
            text = PngImagePlugin.PngInfo()
            text.add_text(PNG_KEY, json.dumps(self.mark | {"index": start + offset}))
            image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            image.save(folder / f"{start + offset:08d}.png", pnginfo=text)
        return {}

    def discard(self, start: int, stop: int) -> None:
        """Remove what an unfinished chunk wrote (images start..stop-1)."""
        for folder in self.root.iterdir():
            if folder.is_dir():
                for index in range(start, stop):
                    (folder / f"{index:08d}.png").unlink(missing_ok=True)

    def finish(self, chunks: list[dict], describe: dict) -> None:
        pass


class ParquetWriter:
    """train/part-<chunk>.parquet and, at the end, manifest.json (a prepared dataset)."""

    def __init__(self, root: Path, shape, class_names: list[str], mark: dict):
        self.root, self.shape, self.class_names = root, tuple(shape), class_names
        self.schema = shard_schema(self.shape)
        (root / "train").mkdir(exist_ok=True)

    def write(self, index: int, start: int, images: np.ndarray, labels: np.ndarray) -> dict:
        if not len(labels):
            return {"shard": None}
        path = self.root / "train" / shard_name(index)
        write_shard(path, images, labels, self.schema)
        return {"shard": path.name}

    def discard(self, start: int, stop: int) -> None:
        pass  # an unfinished chunk's shard is written again whole

    def finish(self, chunks: list[dict], describe: dict) -> None:
        summary = SplitSummary("train")
        for chunk in chunks:  # read back, one shard at a time: the content hash
            if chunk.get("shard"):
                path = self.root / "train" / chunk["shard"]
                summary.record(path, *read_shard(path, self.shape))
        manifest = new_manifest(describe, self.shape, {"train": summary.summary()})
        write_json(self.root / "manifest.json", manifest)


WRITERS = {"imagefolder": ImageFolderWriter, "parquet": ParquetWriter}


def staging_path(out: Path) -> Path:
    """Where an unfinished synthesis of `out` lives (a fixed name, so a re-run finds it)."""
    return out.parent / f".{out.name}.synthesize-partial"


def _resume_state(staging: Path, request: SynthesisRequest) -> list[dict]:
    """The finished chunks of an interrupted run of the same request (none: start over)."""
    if not staging.exists():
        return []
    progress = staging / PROGRESS
    try:
        state = json.loads(progress.read_text())
        ours = state.get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SynthesisError(
            f"{staging} exists but holds no record of an interrupted `ganpipe synthesize` "
            f"({PROGRESS}); move it away or choose another --out"
        )
    if state.get("request") == request.key():
        return list(state["chunks"])
    shutil.rmtree(staging)  # ours, for another request: its images are not these
    return []


def synthesize(request: SynthesisRequest, progress: bool = True) -> dict:
    """Draw `request.num_images` labeled images into `request.out`; return the provenance
    (also written to `out`/synthetic.json)."""
    from pipeline.serving import load, registered_version

    out = Path(request.out)
    check_output_dir(out, STAGE, OUT_KEY)  # before any work: a path it may not replace
    model = load(request.model_uri, request.tracking_uri)
    spec, info = model.spec, model.info
    condition = spec.task_entry.condition
    if condition not in LABELERS:
        raise SynthesisError(
            f"{request.model_uri} is a generator of task {spec.task!r}: synthesize draws "
            f"labeled images from noise (tasks: unconditional, class_conditional)"
        )
    class_names = info.get("class_names") or [str(k) for k in range(spec.num_classes)]
    labeler = LABELERS[condition](request, spec, class_names)
    generator = model.generator.to("cuda" if torch.cuda.is_available() else "cpu")
    provenance = {
        "format": FORMAT,
        "model_uri": request.model_uri,
        "model_version": registered_version(request.model_uri, request.tracking_uri),
        "weights_sha256": info["weights_sha256"],
        "family": spec.family,
        "task": spec.task,
        "num_images": request.num_images,
        "seed": request.seed,
        "seeding": "chunk c draws its noise from torch.Generator seeded with "
        "gan.sampling.mix_seed(seed, c)",
        "chunk_size": request.chunk_size,
        "truncation": request.truncation,
        "labels": labeler.record,
        "class_names": labeler.class_names,
    }
    mark = {k: provenance[k] for k in ("model_uri", "model_version", "weights_sha256")}
    staging = staging_path(out)
    chunks = _resume_state(staging, request)
    staging.mkdir(parents=True, exist_ok=True)
    shape = (spec.resolution, spec.resolution, spec.channels)
    writer = WRITERS[request.format](staging, shape, labeler.class_names, mark)
    done = sum(c["kept"] for c in chunks)
    drawn = sum(c["drawn"] for c in chunks)
    resumed_at = len(chunks)
    bar = tqdm(total=request.num_images, initial=done, desc=f"synthesize {out.name}",
               unit="img", disable=not progress)  # fmt: skip
    tick = time.perf_counter()
    with bar:
        while done < request.num_images:
            if drawn >= MAX_DRAWS_PER_IMAGE * request.num_images:
                raise SynthesisError(
                    f"{drawn} samples drawn, {done} kept: fewer than 1 in "
                    f"{MAX_DRAWS_PER_IMAGE} reach --min-confidence {request.min_confidence}; "
                    "lower it, or label with a featurenet of this generator's data"
                )
            index = len(chunks)
            if index == resumed_at:  # what the interrupted chunk may have left
                writer.discard(done, done + request.chunk_size)
            images, labels, count = labeler.chunk(generator, spec, request, index, done)
            entry = {"chunk": index, "drawn": count, "kept": len(labels)}
            entry |= writer.write(index, done, images, labels)
            entry["class_counts"] = np.bincount(labels, minlength=len(labeler.class_names)).tolist()
            chunks.append(entry)
            done, drawn = done + len(labels), drawn + count
            write_json(staging / PROGRESS, {"format": FORMAT, "request": request.key(),
                                            "chunks": chunks})  # fmt: skip
            bar.update(len(labels))
    counts = np.sum([c["class_counts"] for c in chunks], axis=0).tolist()
    provenance |= {
        "drawn": drawn,
        "rejected": drawn - done,
        "rejected_share": round((drawn - done) / drawn, 6),
        "class_counts": dict(zip(labeler.class_names, counts, strict=True)),
        "seconds": round(time.perf_counter() - tick, 2),
    }
    describe = {
        "source": "synthetic",
        "params": request.key(),
        "class_names": labeler.class_names,
        "task": task_for(True).name,  # its rows carry labels
        "synthetic": {"rows": {"train": done}, "sources": [mark | {"images": done}]},
    }
    writer.finish(chunks, describe)
    write_json(staging / PROVENANCE, provenance)
    (staging / PROGRESS).unlink()
    replace_dir(staging, out, STAGE, OUT_KEY)
    return provenance
