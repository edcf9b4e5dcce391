"""The registered generator as an MLflow pyfunc, logged as code ("models from code"), not pickled.

MLflow copies this file and the `gan` package into the model (nothing else of the repository
travels with it, so this file never imports `pipeline`). Loading the model runs this file and
`load_context`, which reads the exported generator (safetensors + JSON) with
`gan.export.load_generator`: the weights must hash to the sha256 pinned in the MLmodel file
before a byte of them is parsed.

Request: a DataFrame with columns num_images, seed and (optional) label; each row asks for
`num_images` images from noise seeded by `seed`, all of class `label` (conditional models;
-1, or no label column, cycles through the classes; MLflow's schema check refuses a label
column with gaps, so rows without a class say -1). Response: float32 array (N, C, H, W) in
[0, 1], the rows' images one after another; at most MAX_IMAGES per request.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from gan.export import load_generator
from gan.models import GeneratorSpec
from gan.sampling import generate

ARTIFACT = "generator"  # the exported generator directory, as a pyfunc artifact
SHA_KEY = "weights_sha256"  # in the MLmodel metadata and model_config
MAX_IMAGES = 1024  # per request: bounds the memory and time one request can take
CYCLE = -1  # the label value that means "cycle through the classes"


def to_images(
    generator: torch.nn.Module,
    spec: GeneratorSpec,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
) -> torch.Tensor:
    """`num_images` images (N, C, H, W) in [0, 1] from seed-fixed noise; ValueError for a
    request the model cannot answer (too many images, a label it does not know)."""
    if not 1 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be between 1 and {MAX_IMAGES}, got {num_images}")
    if label is not None and spec.num_classes == 0:
        raise ValueError(f"label {label} given, but this generator is unconditional (no classes)")
    images = generate(generator, num_images, spec.z_dim, spec.num_classes, seed, label)
    return ((images + 1) / 2).clamp(0, 1)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Samples images from the generator shipped as the model's `generator` artifact."""

    def load_context(self, context):
        expected = (context.model_config or {}).get(SHA_KEY)
        self.generator, self.spec, _ = load_generator(context.artifacts[ARTIFACT], expected)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        total = int(model_input["num_images"].sum())
        if not 1 <= total <= MAX_IMAGES:
            raise MlflowException(
                f"the request asks for {total} images; between 1 and {MAX_IMAGES} per request",
                INVALID_PARAMETER_VALUE,
            )
        try:
            chunks = [self._images(row) for row in model_input.to_dict("records")]
        except ValueError as exc:  # a request this model cannot answer: HTTP 400 when served
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        return torch.cat(chunks).numpy()  # float32, as `generate` returns

    def _images(self, row: dict) -> torch.Tensor:
        label = int(row.get("label", CYCLE))
        label = None if label == CYCLE else label
        return to_images(self.generator, self.spec, int(row["num_images"]), int(row["seed"]), label)


mlflow.models.set_model(GeneratorModel())
