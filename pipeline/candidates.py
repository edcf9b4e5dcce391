"""A candidate's generator: rebuilt from the model params saved in its checkpoint.

A candidate (pipeline.artifacts.Candidate) is one training run's final checkpoint, listed in
`<train.out_dir>/result.json` (one for a single run, the best trials of a sweep). Its generator
is rebuilt from the model params saved in the checkpoint and the prepared data's shape, so
nothing but safetensors and JSON is read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gan.models import GeneratorSpec
from pipeline.checkpoint import CheckpointError, read_checkpoint


def generator_spec(model: dict, shape: tuple[int, int, int], num_classes: int) -> GeneratorSpec:
    """The generator that `model` params (a ModelParams dump) describe for images of `shape`."""
    height, _, channels = shape
    return GeneratorSpec(
        family=model["family"], channels=channels, resolution=height, z_dim=model["z_dim"],
        width=model["g_width"], num_classes=num_classes if model["conditional"] else 0,
        mlp_depth=model["mlp_depth"], spectral_norm=model["spectral_norm_g"],
    )  # fmt: skip


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
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    generator = spec.build()
    stage = meta.get("stage")
    if stage is not None:  # a growing generator: only its final resolution's layers are kept
        if (stage["resolution"], stage["alpha"]) != (spec.resolution, 1.0):
            raise CheckpointError(
                f"{checkpoint} ended growing at {stage['resolution']} px (alpha "
                f"{stage['alpha']:.3f}), before the final resolution {spec.resolution} was "
                "faded in: there is no generator at the final resolution to evaluate; raise "
                "train.steps or shorten train.stabilise_kimg / train.fade_kimg"
            )
        state = {key: state[key] for key in generator.state_dict()}
    generator.load_state_dict(state)
    return generator.eval(), spec, meta["params"]
