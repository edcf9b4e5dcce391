"""Pulling registered generators: load one by model URI, sample images, write a PNG grid.

`sample("models:/ganpipe-generator@champion", 16)` is the one-line Python API. A registered
version (models:/NAME@ALIAS or models:/NAME/VERSION) is trusted only if its weights hash to
the version's `ganpipe.weights_sha256` registry tag; any other model URI (runs:/..., a local
model directory) to the sha256 pinned in its MLmodel metadata. Weights are read with
`gan.export.load_generator` (safetensors only), so nothing pickled is ever loaded. The same
model also serves over HTTP with `mlflow models serve` (see pipeline/generator_model.py).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from gan.export import ExportError, load_generator
from gan.models import GeneratorSpec
from pipeline.config import Params
from pipeline.errors import RegistryError
from pipeline.files import atomic_path
from pipeline.generator_model import ARTIFACT, SHA_KEY, to_images
from pipeline.registry import SHA_TAG, open_registry
from pipeline.tracking import mlflow_at
from pipeline.tracking import tracking_uri as params_tracking_uri

REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def load_generator_from_uri(
    model_uri: str, tracking_uri: str | None = None
) -> tuple[torch.nn.Module, GeneratorSpec, dict]:
    """The generator (eval mode, CPU), its spec and description, from a model URI; refuses
    weights whose sha256 is not the one the registry (or the MLmodel file) pins."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="ganpipe-model-") as tmp:
        version = None
        if Path(model_uri).is_dir():
            local = Path(model_uri)
        else:
            client = open_registry(uri, must_exist=True)
            version = _registered_version(client, model_uri)
            source = f"models:/{version.name}/{version.version}" if version else model_uri
            local = _download(source, tmp, uri)
        directory, pinned = _read_mlmodel(local, model_uri)
        expected = version.tags.get(SHA_TAG) if version else pinned
        if not expected:
            where = f"tag {SHA_TAG}" if version else f"MLmodel metadata {SHA_KEY}"
            raise RegistryError(
                f"{model_uri} has no {where}: it was not registered by `ganpipe register`, so "
                "its weights cannot be checked; register it with `ganpipe register`"
            )
        try:
            return load_generator(directory, expected)
        except ExportError as exc:
            raise RegistryError(f"{model_uri}: {exc}") from None


def _registered_version(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The registry's version that models:/NAME@ALIAS or models:/NAME/VERSION names (None for
    other URIs); an unknown name, alias or version is an error listing what exists."""
    match = REGISTERED.match(model_uri)
    if match is None:
        return None
    name, alias, number = match["name"], match["alias"], match["version"]
    try:
        found = client.search_registered_models(f"name = '{name}'")
        names = [] if found else sorted(m.name for m in client.search_registered_models())
        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    except MlflowException as exc:
        raise RegistryError(f"model registry {client.tracking_uri}: {exc.message}") from None
    if not found:
        raise RegistryError(
            f"{model_uri}: no registered model {name!r} in {client.tracking_uri}; registered "
            f"models: {', '.join(names) or 'none (run `ganpipe register`)'}"
        )
    aliases = found[0].aliases
    if alias is not None and alias not in aliases:
        known = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items()))
        raise RegistryError(
            f"{model_uri}: model {name!r} has no alias {alias!r}; its aliases: {known or 'none'}"
        )
    number = str(aliases[alias]) if alias is not None else number
    if number not in versions:
        raise RegistryError(
            f"{model_uri}: model {name!r} has no version {number}; its versions: "
            f"{', '.join(sorted(versions, key=int)) or 'none'}"
        )
    return versions[number]


def _download(model_uri: str, destination: str, tracking_uri: str) -> Path:
    try:
        with mlflow_at(tracking_uri):
            path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=destination)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot download {model_uri} from {tracking_uri}: {exc}") from None
    return Path(path)


def _read_mlmodel(local: Path, model_uri: str) -> tuple[Path, str | None]:
    """The exported generator's directory inside a downloaded model, and the pinned sha256."""
    try:
        model = Model.load(local)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{model_uri} is not an MLflow model ({exc})") from None
    artifacts = model.flavors.get("python_function", {}).get("artifacts", {})
    if ARTIFACT not in artifacts:
        raise RegistryError(
            f"{model_uri} has no {ARTIFACT!r} artifact: it is not a generator logged by "
            "`ganpipe register`"
        )
    return local / artifacts[ARTIFACT]["path"], (model.metadata or {}).get(SHA_KEY)


def sample(
    model_uri: str,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
    tracking_uri: str | None = None,
) -> torch.Tensor:
    """`num_images` images (N, C, H, W) in [0, 1] from the model at `model_uri`, from noise
    seeded by `seed`; conditional models draw class `label`, or cycle the classes if None."""
    generator, spec, _ = load_generator_from_uri(model_uri, tracking_uri)
    try:
        return to_images(generator, spec, num_images, seed, label)
    except ValueError as exc:
        raise RegistryError(f"{model_uri}: {exc}") from None


def sample_grid(
    model_uri: str,
    out: str | Path,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
    params: Params | None = None,
    nrow: int = 8,
) -> Path:
    """Write a PNG grid of samples to `out` (atomically: a reader never sees half a file)."""
    from torchvision.utils import save_image

    uri = params_tracking_uri(params) if params is not None else None
    images = sample(model_uri, num_images, seed, label, uri)
    with atomic_path(out) as tmp:
        save_image(images, tmp, nrow=nrow, format="png")
    return Path(out)
