"""A generator on its own: safetensors weights plus a JSON description, nothing pickled.

This is what the evaluate stage exports for each candidate, what the registry packages and
what a served model loads. The directory holds two files: `generator.safetensors` (the weights)
and `generator.json` (`format`, the `spec` a GeneratorSpec is rebuilt from, the weights'
sha256 and free-form provenance). `generator_digest` is one sha256 over both files; the
registry pins it, and `load_generator` refuses files that do not hash to the digest it is
given (or, without one, weights that do not hash to the sha256 in the JSON) before a byte of
them is parsed as weights. The spec is read strictly: an unknown key, a missing one or a value
of the wrong type is an error naming the key, never a TypeError from the constructor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from gan.ema import unwrap
from gan.models import GeneratorSpec

FORMAT = "ganpipe.generator.v1"
WEIGHTS, INFO = "generator.safetensors", "generator.json"
FILES = (INFO, WEIGHTS)  # what the digest covers, in this order
SPEC_FIELDS = typing.get_type_hints(GeneratorSpec)  # name -> type (int, str, bool)
SPEC_REQUIRED = {
    f.name for f in dataclasses.fields(GeneratorSpec) if f.default is dataclasses.MISSING
}
MIN_VALUE = {"num_classes": 0}  # every other integer of the spec is at least 1
MAX_VALUE = 1 << 16  # a bound on every integer of the spec: a resolution of 10**9 is no model


class ExportError(ValueError):
    """A generator directory is missing, damaged, or not the one that was expected."""


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes as 64 hex digits, read 1 MiB at a time (the one copy:
    checkpoints, shards, featurenets and exported generators all use it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(contents: dict[str, bytes]) -> str:
    """The sha256 of a canonical manifest naming each file of FILES with its sha256."""
    manifest = {
        "format": FORMAT,
        "files": {n: hashlib.sha256(contents[n]).hexdigest() for n in FILES},
    }
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _read_files(directory: Path) -> dict[str, bytes]:
    contents = {}
    for name in FILES:
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{path} is missing: {directory} is not an exported generator")
        contents[name] = path.read_bytes()
    return contents


def generator_digest(directory: str | Path) -> str:
    """One sha256 over the weights and the JSON description: what the registry pins."""
    return _digest(_read_files(Path(directory)))


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


def _parse_info(text: bytes, path: Path) -> dict:
    """The JSON description, checked for the keys a loader relies on."""
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ExportError(f"{path} holds a {type(info).__name__}, expected a JSON object")
    if info.get("format") != FORMAT:
        raise ExportError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
    sha = info.get("weights_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ExportError(f"{path}: weights_sha256 {sha!r} is not a sha256 (64 hex digits)")
    return info


def read_generator_info(directory: str | Path) -> dict:
    """The JSON description of an exported generator."""
    path = Path(directory) / INFO
    if not path.is_file():
        raise ExportError(f"{path} is missing: {directory} is not an exported generator")
    return _parse_info(path.read_bytes(), path)


def spec_from_dict(data, where: str | Path) -> GeneratorSpec:
    """A GeneratorSpec from its JSON form, refusing unknown or missing keys and values of the
    wrong type or range with a message naming the key (`where` says which file)."""
    if not isinstance(data, dict):
        raise ExportError(f"{where}: spec is a {type(data).__name__}, expected a JSON object")
    unknown = sorted(set(data) - set(SPEC_FIELDS))
    if unknown:
        raise ExportError(
            f"{where}: unknown spec key(s) {', '.join(map(repr, unknown))}; a generator spec "
            f"has {', '.join(SPEC_FIELDS)}"
        )
    missing = sorted(SPEC_REQUIRED - set(data))
    if missing:
        raise ExportError(f"{where}: spec lacks {', '.join(map(repr, missing))}")
    for key, value in data.items():
        kind = SPEC_FIELDS[key]
        if type(value) is not kind:  # bool is not an int here, nor 2.0
            raise ExportError(
                f"{where}: spec key {key!r} is {value!r} ({type(value).__name__}), expected "
                f"{kind.__name__}"
            )
        low = MIN_VALUE.get(key, 1)
        if kind is int and not low <= value <= MAX_VALUE:
            raise ExportError(f"{where}: spec key {key!r} is {value}, expected {low}..{MAX_VALUE}")
    try:
        return GeneratorSpec(**data)
    except (ValueError, NotImplementedError) as exc:
        raise ExportError(f"{where}: {exc}") from None


def load_generator(
    directory: str | Path, expected_digest: str | None = None
) -> tuple[torch.nn.Module, GeneratorSpec, dict]:
    """The generator in `directory` (eval mode, CPU), its spec and description.

    Both files must hash to `expected_digest` (see `generator_digest`); without one, the
    weights must hash to the sha256 in the description. Only then is anything parsed, from the
    bytes that were hashed, and the weights only as safetensors (no pickle is ever loaded)."""
    directory = Path(directory)
    contents = _read_files(directory)
    weights, info_path = directory / WEIGHTS, directory / INFO
    actual_sha = hashlib.sha256(contents[WEIGHTS]).hexdigest()
    if expected_digest is not None and _digest(contents) != expected_digest:
        raise ExportError(
            f"{directory}: {WEIGHTS} and {INFO} hash to digest {_digest(contents)[:16]}..., but "
            f"{expected_digest[:16]}... is pinned: the weights or the spec were replaced or "
            "damaged; refusing to load them"
        )
    info = _parse_info(contents[INFO], info_path)
    if actual_sha != info["weights_sha256"]:
        raise ExportError(
            f"{weights} has sha256 {actual_sha[:16]}..., expected {info['weights_sha256'][:16]}... "
            f"(from {INFO}): the weights were replaced or damaged; refusing to load them"
        )
    spec = spec_from_dict(info.get("spec"), info_path)
    try:
        generator = spec.build()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise ExportError(f"{info_path}: its spec builds no generator ({exc})") from None
    try:
        state = load(contents[WEIGHTS])
    except Exception as exc:  # safetensors refuses anything that is not safetensors
        raise ExportError(f"{weights} is not a safetensors file ({exc})") from None
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise ExportError(
            f"{weights} does not fit the spec in {INFO} ({detail}); the two files belong to "
            "different generators"
        ) from None
    return generator.eval().requires_grad_(False), spec, info
