"""Where images come from: each source yields (split, image, label) in a fixed order.

Every image leaves here as a square uint8 array (H, W, C) with the configured channels and
resolution: the shorter side resized to `resolution` (Lanczos), then a centre crop. One
conversion path (Pillow) serves every source, so a dataset prepared from an image folder and
the same images from an array give the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import PrepareParams

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
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


def to_square(image: Image.Image, channels: int, resolution: int) -> np.ndarray:
    """Convert to L or RGB, resize the shorter side to `resolution`, centre-crop the square."""
    image = image.convert("L" if channels == 1 else "RGB")
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


def load_imagefolder_source(p: PrepareParams) -> Source:
    """A folder of images: flat (unlabeled) or one subfolder per class (sorted names)."""
    root = Path(p.image_dir)
    if not root.is_dir():
        raise SourceError(f"prepare.image_dir {str(root)!r} is not a directory")
    subfolders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if p.image_labels == "folders" and subfolders:
        classes = [d.name for d in subfolders]
        files = [(f, label) for label, d in enumerate(subfolders) for f in _image_files(d)]
    elif p.image_labels == "folders":
        raise SourceError(
            f"prepare.image_dir {str(root)!r} has no class subfolders, but prepare.image_labels "
            "is 'folders'; put each class in its own subfolder or set image_labels: none"
        )
    else:
        classes = []
        files = [(f, -1) for f in _image_files(root)]
    if not files:
        raise SourceError(
            f"prepare.image_dir {str(root)!r} holds no images (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}{' in its class subfolders' if classes else ''})"
        )
    test = seeded_split(len(files), p.test_fraction, p.seed)
    source = Source(
        "imagefolder", classes, {"train": int((~test).sum()), "test": int(test.sum())}, iter(())
    )

    def items():
        for (path, label), is_test in zip(files, test, strict=True):
            try:
                with Image.open(path) as image:
                    pixels = to_square(image, p.channels, p.resolution)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                source.skipped.append(f"{path} ({type(exc).__name__})")
                continue
            yield ("test" if is_test else "train"), pixels, label
        _check_unreadable(root, source.skipped, len(files), p.skip_bad_images)

    source.items = items()
    return source


def _check_unreadable(root: Path, bad: list[str], total: int, skip: bool) -> None:
    """After decoding: fail on unreadable files unless asked to skip them."""
    if bad and not skip:
        shown = "\n  ".join(bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
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
