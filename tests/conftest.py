"""Shared test helpers."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def tree_digest(root: Path) -> str:
    """A hash of every file's path and bytes under `root` (to prove nothing changed)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def _no_tracking_server_from_the_shell(monkeypatch):
    """Tests use their own sqlite stores, whatever MLFLOW_TRACKING_URI the shell exports."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes of small images in PNG, JPEG and WebP, mixed sizes and modes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    sizes = [(20, 20), (24, 18), (13, 31), (40, 40)]
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(7):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-dependent colour
            suffix = [".png", ".jpg", ".webp"][i % 3]
            image = Image.fromarray(pixels)
            image = image.convert("L") if i == 5 else image
            image.save(
                root / name / f"img{i}{suffix}", **({"lossless": True} if suffix == ".webp" else {})
            )
    return root
