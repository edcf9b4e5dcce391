"""A generator on its own: safetensors weights plus a JSON description, nothing pickled.

This is what the evaluate stage exports for each candidate, what the registry packages and
what a served model loads. `load_generator` rebuilds the network from the JSON (a
GeneratorSpec) and refuses files whose sha256 differs from the one it is given, before a byte
of them is parsed as weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from gan.ema import unwrap
from gan.models import GeneratorSpec

FORMAT = "ganpipe.generator.v1"
WEIGHTS, INFO = "generator.safetensors", "generator.json"


class ExportError(ValueError):
    """A generator directory is missing, damaged, or not the one that was expected."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_generator(
    directory: str | Path, generator: torch.nn.Module, spec: GeneratorSpec, **info
) -> str:
    """Write weights and description into `directory`; the weights' sha256.

    The same weights always give the same file (and hash): safetensors orders its header."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(generator).state_dict().items()}
    save_file(state, directory / WEIGHTS, metadata={"format": FORMAT})
    sha = sha256_file(directory / WEIGHTS)
    description = {"format": FORMAT, "spec": spec.to_dict(), "weights_sha256": sha, **info}
    (directory / INFO).write_text(json.dumps(description, indent=1, sort_keys=True) + "\n")
    return sha


def read_generator_info(directory: str | Path) -> dict:
    """The JSON description of an exported generator."""
    path = Path(directory) / INFO
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {directory} is not an exported generator") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def load_generator(
    directory: str | Path, expected_sha256: str | None = None
) -> tuple[torch.nn.Module, GeneratorSpec, dict]:
    """The generator in `directory` (eval mode, CPU), its spec and description.

    The weights file must hash to `expected_sha256` (default: the hash in the description);
    only then is it read, and only as safetensors (no pickle is ever loaded)."""
    directory = Path(directory)
    info = read_generator_info(directory)
    expected = expected_sha256 or info["weights_sha256"]
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{weights} is missing")
    data = weights.read_bytes()  # hashed and parsed from the same bytes
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ExportError(
            f"{weights} has sha256 {actual[:16]}..., expected {expected[:16]}...: the weights were "
            "replaced or damaged; refusing to load them"
        )
    spec = GeneratorSpec(**info["spec"])
    generator = spec.build()
    try:
        state = load(data)
    except Exception as exc:  # safetensors refuses anything that is not safetensors
        raise ExportError(f"{weights} is not a safetensors file ({exc})") from None
    generator.load_state_dict(state)
    return generator.eval().requires_grad_(False), spec, info
