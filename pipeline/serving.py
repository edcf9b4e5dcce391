"""Pulling registered generators: load one by model URI, sample images, write a PNG grid.

`sample("models:/ganpipe-generator@champion", 16)` is the one-line Python API. Every load
checks, before anything is parsed, that the model directory is data only (the MLmodel names
the installed loader module `pipeline.generator_model`, no file is code) and that its
weights and spec hash to the digest the tracking store pins: a registered version
(models:/NAME@ALIAS, models:/NAME/VERSION) by its `ganpipe.generator_digest` tag, a logged
model (models:/m-...) and any other remote URI by its logged model's tag. A local directory
is checked against its logged model's tag when the tracking store knows it, else against the
digest stored alongside in its MLmodel, with a warning (see pipeline/generator_model.py and
docs/models.md). Weights are read as safetensors only, so nothing pickled is ever loaded.
`fetch_verified` makes such a checked copy to serve with `mlflow models serve`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gan.models import GeneratorSpec
from pipeline.config import Params
from pipeline.errors import RegistryError
from pipeline.files import atomic_path
from pipeline.generator_model import (
    CYCLE,
    DIGEST_TAG,
    check_data_only,
    load_checked,
    logged_model_digest,
    open_registry,
    to_images,
    trusted_digest,
)
from pipeline.tracking import mlflow_at
from pipeline.tracking import tracking_uri as params_tracking_uri

REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)$")
REREGISTER = "re-register it with `ganpipe register`"


def load_generator_from_uri(
    model_uri: str, tracking_uri: str | None = None
) -> tuple[torch.nn.Module, GeneratorSpec, dict]:
    """The generator (eval mode, CPU), its spec and description, from a model URI; refuses
    a model that is not data only, or whose files do not hash to the pinned digest."""
    with tempfile.TemporaryDirectory(prefix="ganpipe-model-") as tmp:
        data, digest = _checked(model_uri, tracking_uri, Path(tmp))
        return load_checked(data, digest, model_uri)


def fetch_verified(
    model_uri: str, destination: str | Path, tracking_uri: str | None = None
) -> Path:
    """Download the model at `model_uri` into `destination` (a new or empty directory) and
    check it as `load_generator_from_uri` does; the directory, ready for `mlflow models serve`."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise RegistryError(f"{destination} is not empty; give a new directory to download into")
    if Path(model_uri).is_dir():
        raise RegistryError(f"{model_uri} is a local directory already; serve it as it is")
    destination.mkdir(parents=True, exist_ok=True)
    data, digest = _checked(model_uri, tracking_uri, destination)
    load_checked(data, digest, model_uri)  # parses: the spec builds, the weights fit it
    return destination


def _checked(model_uri: str, tracking_uri: str | None, download_to: Path) -> tuple[Path, str]:
    """The model's data directory (downloaded into `download_to` unless `model_uri` is a local
    directory), checked to be data only, and the digest its files must hash to."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    if Path(model_uri).is_dir():
        data, model = check_data_only(Path(model_uri), model_uri)
        return data, trusted_digest(model, model_uri, uri)
    client = open_registry(uri, must_exist=True)
    version, logged = _registered_version(client, model_uri), LOGGED.match(model_uri)
    source, pinned = model_uri, None
    if version is not None:
        source = f"models:/{version.name}/{version.version}"
        pinned = version.tags.get(DIGEST_TAG)
        if not pinned:
            raise RegistryError(
                f"{model_uri}: version {version.version} of {version.name!r} has no tag "
                f"{DIGEST_TAG}: it was registered by an older ganpipe, whose models ship code "
                f"that ganpipe no longer runs; {REREGISTER}"
            )
    elif logged is not None:
        pinned = logged_model_digest(client, logged["id"])
        if not pinned:
            raise RegistryError(
                f"{model_uri}: {uri} has no logged model {logged['id']} with a tag {DIGEST_TAG}, "
                f"so its files cannot be checked; {REREGISTER}"
            )
    data, model = check_data_only(_download(source, download_to, uri), model_uri)
    if pinned is None:  # runs:/..., s3://...: the tracking store must know its logged model
        pinned = logged_model_digest(client, model.model_id) if model.model_id else None
        if not pinned:
            raise RegistryError(
                f"{model_uri}: {uri} pins no digest for it (logged model {model.model_id}); "
                "load it as models:/NAME@ALIAS or models:/m-<id> of the registry it came from"
            )
    return data, pinned


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


def _download(model_uri: str, destination: Path, tracking_uri: str) -> Path:
    try:
        with mlflow_at(tracking_uri):
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(destination)
            )
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot download {model_uri} from {tracking_uri}: {exc}") from None
    return Path(path)


def sample(
    model_uri: str,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
    tracking_uri: str | None = None,
) -> torch.Tensor:
    """`num_images` images (N, C, H, W) in [0, 1] from the model at `model_uri`, from noise
    seeded by `seed`; conditional models draw class `label`, or cycle the classes if None or
    -1 (as the served model does)."""
    generator, spec, _ = load_generator_from_uri(model_uri, tracking_uri)
    try:
        return to_images(generator, spec, num_images, seed, None if label == CYCLE else label)
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
