"""Where images come from: each source yields (split, image, label) in a fixed order.

Every image leaves here as a square uint8 array (H, W, C) with the configured channels and
resolution: the shorter side resized to `resolution` (Lanczos), then a centre crop. One
conversion path (Pillow) serves every source, so a dataset prepared from an image folder and
the same images from an array give the same pixels. On the way: 16-bit grayscale is scaled to
8 bits (65535 -> 255), not clipped; transparent images (an alpha channel, or a transparent
palette colour) are composited on a white background, and the image folder source lists them
in the manifest (`transparent_files`).

Image folders are read as the user laid them out, and nothing else: a symbolic link inside
`image_dir` (which may point anywhere) is an error unless `prepare.follow_symlinks` is set; a
decompression bomb (more pixels than Pillow's limit, Image.MAX_IMAGE_PIXELS) counts as an
unreadable file; labels from folders need at least two class subfolders; and each split must
get MIN_SPLIT_IMAGES images, so that a folder too small for the pipeline stops here with the
sizes it needs rather than later in featurenet or train.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import PrepareParams

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MIN_SPLIT_IMAGES = 2  # per split: FID's covariance (evaluate's floor on the test split) needs two
BACKGROUND = "white"  # what transparent pixels are composited on
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how some Pillows open them
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
MAX_LISTED = 5
PNG_KEY = "ganpipe.synthetic"  # the PNG text chunk `ganpipe synthesize` marks its images with
TORCHVISION_SOURCES = {
    # name -> (torchvision class, files to place by hand when offline, where, relative to raw_dir)
    "mnist": (
        "MNIST",
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz",
        "MNIST/raw/",
    ),
    "fashion_mnist": (
        "FashionMNIST",
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz",
        "FashionMNIST/raw/",
    ),
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)", ""),
}


class SourceError(ValueError):
    """The configured source cannot be read; the message says what to fix."""


@dataclass
class Source:
    """A dataset ready to be written: images per split, in order, with labels (-1: none)."""

    name: str
    class_names: list[str]
    splits: dict[str, int]  # split -> number of images (before skipping unreadable ones)
    items: Iterator[tuple[str, np.ndarray, int]]  # (split, HxWxC uint8, label)
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped on request
    transparent: list[str] = field(default_factory=list)  # files composited on BACKGROUND
    synthetic: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> split -> rows

    def synthetic_record(self) -> dict | None:
        """The manifest's `synthetic` entry: rows per split and per source model; None when
        every image is real."""
        if not self.synthetic:
            return None
        rows = {s: sum(c.get(s, 0) for c in self.synthetic.values()) for s in self.splits}
        sources = [json.loads(key) | {"images": sum(counts.values())}
                   for key, counts in sorted(self.synthetic.items())]  # fmt: skip
        return {"rows": rows, "sources": sources}


def has_alpha(image: Image.Image) -> bool:
    """Whether some pixels may be (partly) transparent."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def to_8bit_opaque(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (rounded); transparency composited on BACKGROUND.
    Other images are returned as they are."""
    if image.mode in SIXTEEN_BIT_MODES:
        deep = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(((np.clip(deep, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))
    if has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image


def to_square(image: Image.Image, channels: int, resolution: int) -> np.ndarray:
    """Convert to L or RGB (to_8bit_opaque first), resize the shorter side to `resolution`,
    centre-crop the square."""
    image = to_8bit_opaque(image).convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)


def seeded_split(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of test rows: round(n * test_fraction) of them, chosen by `seed`."""
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng(seed).permutation(n)[: round(n * test_fraction)]] = True
    return test


def _from_arrays(
    name: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], p
) -> Source:
    def items():
        for split, (images, labels) in arrays.items():
            for image, label in zip(images, labels, strict=True):
                yield split, to_square(Image.fromarray(image), p.channels, p.resolution), int(label)

    return Source(name, classes, {s: len(a[0]) for s, a in arrays.items()}, items())


def load_digits_source(p: PrepareParams) -> Source:
    """scikit-learn's bundled 8x8 digits (values 0..16), scaled to 0..255; seeded split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    test = seeded_split(len(images), p.test_fraction, p.seed)
    arrays = {
        "train": (images[~test], digits.target[~test]),
        "test": (images[test], digits.target[test]),
    }
    return _from_arrays("digits", arrays, [str(c) for c in digits.target_names], p)


def load_torchvision_source(p: PrepareParams) -> Source:
    """MNIST, Fashion-MNIST or CIFAR-10 with their own splits, downloaded into raw_dir."""
    import torchvision.datasets as tvd

    class_name, files, where = TORCHVISION_SOURCES[p.source]
    dataset_class = getattr(tvd, class_name)
    raw = Path(p.raw_dir)
    try:
        splits = {
            s: dataset_class(raw, train=s == "train", download=True) for s in ("train", "test")
        }
    except (RuntimeError, OSError) as exc:
        raise SourceError(
            f"prepare.source {p.source!r}: could not download or find the dataset ({exc}). "
            f"Without internet, place {files} in {raw / where} and run again."
        ) from None
    arrays = {s: (np.asarray(d.data), np.asarray(d.targets)) for s, d in splits.items()}
    return _from_arrays(p.source, arrays, list(splits["train"].classes), p)


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _refuse_links(root: Path, entries: list[Path]) -> None:
    """Without prepare.follow_symlinks, a symbolic link among the entries to read is an error:
    it may point outside image_dir (another user's files, a mounted secret)."""
    links = [e for e in entries if e.is_symlink()]
    if links:
        shown = ", ".join(f"{link} -> {os.readlink(link)}" for link in links[:MAX_LISTED])
        more = f" and {len(links) - MAX_LISTED} more" if len(links) > MAX_LISTED else ""
        raise SourceError(
            f"prepare.image_dir {str(root)!r} holds {len(links)} symbolic link(s), which may "
            f"point outside it: {shown}{more}. Replace them by the files or folders themselves, "
            "or set prepare.follow_symlinks: true to read what they point to"
        )


def _labeled_files(root: Path, p: PrepareParams) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (file, label) pairs): one class per subfolder, at least two of them."""
    subfolders = _class_folders(root)
    if not p.follow_symlinks:
        _refuse_links(root, subfolders)
    if not subfolders:
        raise SourceError(
            f"prepare.image_dir {str(root)!r} has no class subfolders, but prepare.image_labels "
            "is 'folders'; put each class in its own subfolder or set image_labels: none"
        )
    per_class = [_image_files(d) for d in subfolders]
    if not p.follow_symlinks:
        _refuse_links(root, [f for files in per_class for f in files])
    with_images = [(d, files) for d, files in zip(subfolders, per_class, strict=True) if files]
    if len(with_images) == 1:
        (folder, files), others = with_images[0], len(subfolders) - 1
        empty = f" ({others} other subfolder(s) hold no images)" if others else ""
        raise SourceError(
            f"prepare.image_dir {str(root)!r} has one class subfolder ({folder.name!r}, "
            f"{len(files)} images){empty}, and labels need at least two (one subfolder per "
            "class, prepare.image_labels: folders). Add a subfolder per class, or prepare "
            f"these images unlabeled: prepare.image_dir: {folder} with prepare.image_labels: none"
        )
    files = [(f, label) for label, d in enumerate(per_class) for f in d]
    return [d.name for d in subfolders], files


def split_sizes_needed(test_fraction: float) -> int:
    """The fewest images whose seeded split (seeded_split) gives each split MIN_SPLIT_IMAGES."""
    n = 2 * MIN_SPLIT_IMAGES
    while not MIN_SPLIT_IMAGES <= round(n * test_fraction) <= n - MIN_SPLIT_IMAGES:
        n += 1
    return n


def check_split_sizes(counts: dict[str, int], p: PrepareParams, skipped: int = 0) -> None:
    """Each of train and test must hold MIN_SPLIT_IMAGES images (SourceError says how many
    images that takes at prepare.test_fraction)."""
    train, test = counts.get("train", 0), counts.get("test", 0)
    if min(train, test) >= MIN_SPLIT_IMAGES:
        return
    after = f" after skipping {skipped} unreadable file(s)" if skipped else ""
    where = f"prepare.image_dir {p.image_dir!r}" if p.image_dir else f"prepare.source {p.source!r}"
    raise SourceError(
        f"{where}: {train + test} images{after} make a train split "
        f"of {train} and a test split of {test} (prepare.test_fraction {p.test_fraction}); each "
        f"split needs at least {MIN_SPLIT_IMAGES} images (featurenet and evaluate use both), so "
        f"at least {split_sizes_needed(p.test_fraction)} images at this test_fraction. Add "
        "images, or change prepare.test_fraction"
    )


def _decode(path: Path, p: PrepareParams) -> tuple[np.ndarray, bool]:
    """One file's pixels and whether it had transparency; a decompression bomb (Pillow's
    warning or error) raises like an unreadable file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return to_square(image, p.channels, p.resolution), has_alpha(image)


def _why_unreadable(exc: Exception) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        size = re.search(r"\((\d+) pixels\)", str(exc))
        return (
            f"decompression bomb: {size[1]} pixels, more than Pillow accepts "
            f"(PIL.Image.MAX_IMAGE_PIXELS {Image.MAX_IMAGE_PIXELS})"
            if size
            else f"decompression bomb: {exc}"
        )
    return type(exc).__name__


UNREADABLE = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)  # fmt: skip


def load_imagefolder_source(p: PrepareParams) -> Source:
    """A folder of images: flat (unlabeled) or one subfolder per class (sorted names)."""
    root = Path(p.image_dir)
    if not root.is_dir():
        raise SourceError(f"prepare.image_dir {str(root)!r} is not a directory")
    if p.image_labels == "folders":
        classes, files = _labeled_files(root, p)
    else:
        classes = []
        flat = _image_files(root)
        if not p.follow_symlinks:
            _refuse_links(root, flat)
        files = [(f, -1) for f in flat]
    if not files:
        raise SourceError(
            f"prepare.image_dir {str(root)!r} holds no images (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}{' in its class subfolders' if classes else ''})"
        )
    marks = [synthetic_mark(path) for path, _ in files]
    test = _split_synthetic(root, files, marks, p)
    splits = {"train": int((~test).sum()), "test": int(test.sum())}
    check_split_sizes(splits, p)
    source = Source("imagefolder", classes, splits, iter(()))

    def items():
        for (path, label), is_test, mark in zip(files, test, marks, strict=True):
            try:
                pixels, transparent = _decode(path, p)
            except UNREADABLE as exc:
                source.skipped.append(f"{path} ({_why_unreadable(exc)})")
                continue
            if transparent:
                source.transparent.append(str(path))
            split = "test" if is_test else "train"
            if mark is not None:
                counts = source.synthetic.setdefault(mark, {})
                counts[split] = counts.get(split, 0) + 1
            yield split, pixels, label
        _check_unreadable(root, source.skipped, len(files), p.skip_bad_images)

    source.items = items()
    return source


def synthetic_mark(path: Path) -> str | None:
    """Which model a `ganpipe synthesize` PNG came from (its PNG_KEY text: model URI, version,
    weights sha256), as a canonical JSON key; None for any other file."""
    if path.suffix.lower() != ".png":
        return None
    try:
        with Image.open(path) as image:  # text chunks before the pixels: read by open
            text = image.info.get(PNG_KEY)
    except UNREADABLE:
        return None
    if not isinstance(text, str):
        return None
    try:
        mark = json.loads(text)
    except ValueError:
        mark = None
    fields = ("model_uri", "model_version", "weights_sha256")
    mark = {k: mark.get(k) for k in fields} if isinstance(mark, dict) else dict.fromkeys(fields)
    return json.dumps(mark, sort_keys=True)


def _split_synthetic(
    root: Path, files: list[tuple[Path, int]], marks: list[str | None], p: PrepareParams
) -> np.ndarray:
    """The test mask: seeded over the real files only when synthetic ones (with a mark) are
    mixed in (they go to train: a test split must be real), over all of them otherwise. A mix
    is an error without prepare.allow_synthetic."""
    synthetic = np.array([mark is not None for mark in marks], dtype=bool)
    if synthetic.all() or not synthetic.any():
        return seeded_split(len(files), p.test_fraction, p.seed)
    if not p.allow_synthetic:
        shown = ", ".join(str(files[i][0]) for i in np.flatnonzero(synthetic)[:3])
        raise SourceError(
            f"prepare.image_dir {str(root)!r} mixes {int(synthetic.sum())} images written by "
            f"`ganpipe synthesize` (marked in their PNG metadata, e.g. {shown}) with "
            f"{int((~synthetic).sum())} real ones; prepared together, generated images pass "
            "for real data. Move them out, or set prepare.allow_synthetic: true to add them "
            "to the train split only (the manifest counts them as synthetic)"
        )
    test = np.zeros(len(files), dtype=bool)
    test[~synthetic] = seeded_split(int((~synthetic).sum()), p.test_fraction, p.seed)
    return test


def _check_unreadable(root: Path, bad: list[str], total: int, skip: bool) -> None:
    """After decoding: fail on unreadable files unless asked to skip them."""
    if bad and not skip:
        shown = "\n  ".join(bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise SourceError(
            f"{len(bad)} unreadable image file(s) in {str(root)!r}:\n  {shown}{more}\n"
            "Fix or remove them, or set prepare.skip_bad_images: true to skip them "
            "(the count is recorded in the manifest)"
        )
    if len(bad) == total:
        raise SourceError(
            f"prepare.image_dir {str(root)!r}: none of its {total} images could be read"
        )


def load_source(p: PrepareParams) -> Source:
    """The source named by prepare.source."""
    if p.source == "digits":
        return load_digits_source(p)
    if p.source in TORCHVISION_SOURCES:
        return load_torchvision_source(p)
    return load_imagefolder_source(p)
