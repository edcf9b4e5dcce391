"""What the train stage hands on: candidate generators, and how to load one from its checkpoint.

A candidate is one training run's final checkpoint, listed in `<train.out_dir>/result.json`
(one for a single run, the best trials of a sweep). Its generator is rebuilt from the model
params saved in the checkpoint and the prepared data's shape, so nothing but safetensors and
JSON is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gan.models import GeneratorSpec
from pipeline.checkpoint import CheckpointError, read_checkpoint
from pipeline.files import read_stage_json
from pipeline.shards import DataError

RESULT = "result.json"
BEST_PARAMS = "best_params.yaml"  # <train.out_dir>: the params of the run (a sweep's best trial)
GENERATORS = "generators"  # <evaluate.out_dir>/generators/<candidate>: what evaluate scored


@dataclass(frozen=True)
class Candidate:
    """One trained generator the evaluate stage scores."""

    name: str  # the training run's name (gan-<family>-<hash>)
    checkpoint: Path
    mlflow_run_id: str | None
    diverged: bool
    steps: int


def generator_spec(model: dict, shape: tuple[int, int, int], num_classes: int) -> GeneratorSpec:
    """The generator that `model` params (a ModelParams dump) describe for images of `shape`."""
    height, _, channels = shape
    return GeneratorSpec(
        family=model["family"], channels=channels, resolution=height, z_dim=model["z_dim"],
        width=model["g_width"], num_classes=num_classes if model["conditional"] else 0,
        mlp_depth=model["mlp_depth"], spectral_norm=model["spectral_norm_g"],
    )  # fmt: skip


def list_candidates(train_out: str | Path) -> list[Candidate]:
    """The candidates in the train stage's result.json, with absolute checkpoint paths."""
    train_out = Path(train_out)
    path = train_out / RESULT
    result = read_stage_json(path, "train", DataError)
    candidates = [
        Candidate(
            name=c["name"],
            checkpoint=(train_out / c["checkpoint"]).resolve(),
            mlflow_run_id=c.get("mlflow_run_id"),
            diverged=bool(c.get("diverged")),
            steps=int(c.get("steps", 0)),
        )  # fmt: skip
        for c in result.get("candidates", [])
    ]
    if not candidates:
        raise DataError(f"{path} lists no candidates with a checkpoint; re-run the train stage")
    return candidates


def generator_from_checkpoint(
    checkpoint: str | Path, manifest: dict, which: str = "ema"
) -> tuple[torch.nn.Module, GeneratorSpec, dict]:
    """The EMA (or raw) generator of a train checkpoint (eval mode, CPU), its spec, and the
    run's identity (model and train params, dataset version) the checkpoint was saved with.

    The checkpoint must come from the prepared data described by `manifest`: a generator is
    only comparable with the real images it was trained on."""
    tensors, meta = read_checkpoint(Path(checkpoint))
    if meta["dataset_hash"] != manifest["dataset_hash"]:
        raise CheckpointError(
            f"{checkpoint} was trained on dataset {meta['dataset_hash'][:12]}, but the prepared "
            f"data is {manifest['dataset_hash'][:12]}; re-run the train stage (dvc repro)"
        )
    classes = len(manifest.get("class_names", []))
    spec = generator_spec(meta["params"]["model"], tuple(manifest["shape"]), classes)
    prefix = "generator_ema." if which == "ema" else "generator."
    generator = spec.build()
    generator.load_state_dict(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    )
    return generator.eval(), spec, meta["params"]
