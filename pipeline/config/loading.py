"""From a params file (and `--set` overrides) to a validated Params: read as DVC reads it (UTF-8
and YAML 1.2, pipeline/params_yaml.py), override, validate; any problem is one ParamsError.

Also the inverse of an override's dotted key: `flatten` turns sections into 'section.key'
names (what MLflow logs as params).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config.messages import ParamsError, invalid_params
from pipeline.config.schema import DIMENSIONS, Params
from pipeline.errors import echo, shorten
from pipeline.params_yaml import YAMLInputError, parse_yaml

DEFAULT_PARAMS_FILE = Path("params.yaml")


def validate_params(raw: Any, source: str = str(DEFAULT_PARAMS_FILE)) -> Params:
    """Validate an already-parsed params mapping; ParamsError names every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise invalid_params(exc.errors(), source, Params, DIMENSIONS) from None


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `raw` with each 'section.key=value' set; values are parsed as YAML."""
    result: dict[str, Any] = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(
                f"override {echo(item)}: expected section.key=value, e.g. train.lr_g=1e-4"
            )
        parts = key.strip().split(".")
        if parts[:2] == ["sweep", "space"] and len(parts) > 3:  # space keys are 'section.key'
            parts = [*parts[:2], ".".join(parts[2:4]), *parts[4:]]
        *parents, leaf = parts
        node = result
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = shorten(".".join(parents[: depth + 1]))
                raise ParamsError(f"override {echo(item)}: {where} is a value, not a section")
        try:
            node[leaf] = parse_yaml(text)
        except YAMLInputError as exc:
            raise ParamsError(f"override {echo(item)}: {exc}") from None
    return result


def parse_yaml_file(path: Path) -> Any:
    """The parsed content of a params file; ParamsError if it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")  # what DVC reads it as
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: no such params file; run from the project root or pass --params PATH"
        ) from None
    except IsADirectoryError:
        raise ParamsError(
            f"{path}: is a directory, not a params file; pass --params {path / 'params.yaml'}"
        ) from None
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); DVC reads "
            "params files as UTF-8 too: save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror})") from None
    try:
        return parse_yaml(text)
    except YAMLInputError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Read (as DVC does: UTF-8 and YAML 1.2, pipeline/params_yaml.py), override and validate
    a params file; ParamsError on any problem."""
    path = Path(path)
    raw = parse_yaml_file(path)
    if overrides:
        if raw is not None and not isinstance(raw, Mapping):
            raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        raw = apply_overrides(raw or {}, overrides)
    return validate_params(raw, str(path))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr_g': 1e-4}} -> {'train.lr_g': 1e-4}; empty sections stay as {}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
