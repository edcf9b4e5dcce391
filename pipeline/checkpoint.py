"""Training checkpoints as safetensors + JSON: no pickle is written, and none is ever loaded.

A checkpoint is a directory with
    weights.safetensors   generator, EMA generator, discriminator, both optimisers' tensors,
                          the torch (and CUDA) RNG states
    state.json            step, data position, optimiser hyperparameters, numpy and Python RNG
                          states, the params and the dataset version it was trained with, the
                          MLflow run it belongs to, and the sha256 of weights.safetensors
Non-finite weights are never written: saving them raises CheckpointError. A damaged file (cut
short by a full disk or a killed copy, or changed) is named in the error; `newest_intact` picks
the newest checkpoint of a run that is whole, so a run resumes from the one before a damaged one.
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gan.ema import unwrap
from gan.export import sha256_file

FORMAT = "ganpipe.checkpoint.v1"
WEIGHTS, STATE = "weights.safetensors", "state.json"
MODULES = ("generator", "generator_ema", "discriminator")
OPTIMIZERS = ("opt_g", "opt_d")
IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # not state


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says which and why."""


@dataclass
class TrainingState:
    """What a checkpoint holds besides the tensors of the modules and optimisers."""

    step: int  # generator updates done
    epoch: int  # data position: epoch of the next batch
    batch: int  # data position: index of the next batch within that epoch
    params: dict  # the validated params the run was started with
    dataset_hash: str
    mlflow_run_id: str | None = None  # the MLflow run that trained it (None: untracked, or older)
    # progressive growing: the stage its last step trained ({resolution, alpha, phase}); None
    # for families that do not grow
    stage: dict | None = None


def _optimizer_parts(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}.state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(
    name: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict
) -> None:
    state: dict[int, dict] = {}
    prefix = f"{name}.state."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # How the optimiser computes (fused, foreach) is this process's choice, not saved state: a
    # checkpoint from before gan.step.adam must not turn the fused kernel off.
    built = [{k: g[k] for k in IMPLEMENTATION if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, implementation in zip(optimizer.param_groups, built, strict=True):
        group.update(implementation)


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    return tensors, meta


def _restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():  # as many devices as this process sees
        for index in range(torch.cuda.device_count()):
            if f"rng.cuda.{index}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{index}"], index)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def save_checkpoint(
    directory: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainingState,
) -> Path:
    """Write a checkpoint into `directory` (created; replaced atomically if it exists)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in MODULES:
        for key, value in unwrap(modules[name]).state_dict().items():
            tensors[f"{name}.{key}"] = value
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"refusing to checkpoint non-finite weights at step {state.step}: {', '.join(bad[:5])}"
        )
    optimizer_meta = {}
    for name in OPTIMIZERS:
        opt_tensors, optimizer_meta[name] = _optimizer_parts(name, optimizers[name])
        tensors.update(opt_tensors)
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    meta = {
        "format": FORMAT,
        **state.__dict__,
        "optimizers": optimizer_meta,
        "rng": rng_meta,
    }
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, tmp / WEIGHTS, metadata={"format": FORMAT})
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        (tmp / STATE).write_text(json.dumps(meta, indent=1))
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        if directory.exists():
            directory.rename(old)  # kept until the new checkpoint is in place
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_files(directory: Path) -> None:
    weights, state = directory / WEIGHTS, directory / STATE
    if not (weights.is_file() and state.is_file()):
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise CheckpointError(
            f"{directory} is not a ganpipe checkpoint (expected {WEIGHTS} and {STATE}, found "
            f"{found or 'nothing'}); pickled checkpoints (.pt, .pth, .pkl) are never loaded"
        )


def read_state(directory: Path) -> dict:
    """The JSON of a checkpoint, its weights file checked against it (sha256, or where an older
    checkpoint has none, the safetensors header against the file's size) without loading the
    tensors; a damaged or foreign file is a CheckpointError that names it."""
    directory = Path(directory)
    _check_files(directory)
    weights, state = directory / WEIGHTS, directory / STATE
    try:
        meta = json.loads(state.read_bytes())
    except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"{state} is damaged (not valid JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{state}: format {found!r}, expected {FORMAT!r}")
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights} is damaged (its sha256 differs from the one {STATE} recorded when it "
            "was written: the file was cut short or changed)"
        )
    try:
        with safe_open(weights, "pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is damaged ({exc})") from None
    return meta


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON of a checkpoint directory; anything else is refused."""
    directory = Path(directory)
    meta = read_state(directory)
    try:
        tensors = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS} is damaged ({exc})") from None
    return tensors, meta


@dataclass
class Resumable:
    """The checkpoint a run resumes from, and the newer ones that were damaged."""

    path: Path
    state: dict  # its state.json
    damaged: list[str] = field(default_factory=list)  # the errors of newer, damaged ones


def newest_intact(directories: Iterable[Path]) -> Resumable | None:
    """The first whole checkpoint of `directories` (newest first), None if there are none; a
    CheckpointError listing every file at fault when all of them are damaged."""
    damaged = []
    for directory in directories:
        try:
            return Resumable(Path(directory), read_state(directory), damaged)
        except CheckpointError as exc:
            damaged.append(str(exc))
    if damaged:
        raise CheckpointError(all_damaged_message(damaged))
    return None


def all_damaged_message(damaged: list[str]) -> str:
    """What to say when no checkpoint of a run can be resumed."""
    return (
        "no checkpoint of this run can be resumed: " + "; ".join(damaged) + ". Restore the "
        "files from a copy, or delete the run's directory under ray.storage_path to train it "
        "again from step 0 (as a new MLflow run; the old run stays as it was)"
    )


def load_checkpoint(
    directory: Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    restore_rng: bool = True,
) -> TrainingState:
    """Restore modules, optimisers and (optionally) the global RNGs; return the step state."""
    tensors, meta = read_checkpoint(directory)
    for name in MODULES:
        prefix = f"{name}."
        state_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        unwrap(modules[name]).load_state_dict(state_dict)
    for name in OPTIMIZERS:
        _restore_optimizer(name, optimizers[name], tensors, meta["optimizers"][name])
    if restore_rng:
        _restore_rng(tensors, meta["rng"])
    return training_state(meta)


def training_state(meta: dict) -> TrainingState:
    """The TrainingState of a checkpoint's JSON (written by this or an older version)."""
    optional = {"mlflow_run_id": None, "stage": None}
    fields = TrainingState.__dataclass_fields__
    missing = [k for k in fields if k not in meta and k not in optional]
    if missing:
        raise CheckpointError(f"{STATE} lacks {', '.join(missing)}: not written by ganpipe")
    return TrainingState(**{k: meta.get(k, optional.get(k)) for k in fields})
