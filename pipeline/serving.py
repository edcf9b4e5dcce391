"""Pulling registered generators: load one by model URI, sample and interpolate images, write
a PNG grid or a GIF.

`load(model_uri)` gives a `LoadedGenerator` (`ganpipe.load` is this function: the user API,
docs/models.md); `sample("models:/ganpipe-generator@champion", 16)` loads and samples in one
call. Every load
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

import contextlib
import re
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gan.models import GeneratorSpec
from gan.tasks import Task
from pipeline.config import Params
from pipeline.errors import RegistryError
from pipeline.files import atomic_path
from pipeline.generator_model import (
    CYCLE,
    DIGEST_TAG,
    check_data_only,
    interpolation_images,
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


def registered_version(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """The registry version number that models:/NAME@ALIAS or models:/NAME/VERSION names now
    (None for other URIs): provenance for what was drawn from an alias."""
    if REGISTERED.match(model_uri) is None:
        return None
    client = open_registry(tracking_uri or mlflow.get_tracking_uri(), must_exist=True)
    return str(_registered_version(client, model_uri).version)


def _download(model_uri: str, destination: Path, tracking_uri: str) -> Path:
    try:
        with mlflow_at(tracking_uri):
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(destination)
            )
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot download {model_uri} from {tracking_uri}: {exc}") from None
    return Path(path)


# What each condition's requests need: the method of LoadedGenerator that answers them.
ENTRY_FOR = {"none": "sample", "label": "sample", "image": "translate", "text": "prompt"}
IMAGE_FORMATS = (".png", ".gif")  # save_images: a grid, or an animation of the images


class LoadedGenerator:
    """A generator loaded and checked from a model URI (what `load` returns): `sample`,
    `interpolate`, and `translate` / `prompt` for the tasks that take an image / a text.
    Arguments the model cannot take (a label of an unconditional model, psi out of 0..1) are
    a ValueError naming the model."""

    def __init__(self, generator: torch.nn.Module, spec: GeneratorSpec, info: dict, model_uri: str):
        self.generator = generator  # the network: eval mode, CPU
        self.spec = spec  # what it is (family, resolution, z_dim, num_classes, task)
        self.info = info  # its description: provenance written at export (gan.export)
        self.model_uri = model_uri

    @property
    def task(self) -> Task:
        """The task contract entry (gan.tasks) of the model: what a sample is conditioned on."""
        return self.spec.task_entry

    def __repr__(self) -> str:
        spec = self.spec
        return (
            f"LoadedGenerator({self.model_uri!r}: {spec.family}, task {spec.task}, "
            f"{spec.channels}x{spec.resolution}x{spec.resolution}, z_dim {spec.z_dim})"
        )

    def sample(
        self, num_images: int, seed: int = 0, label: int | None = None, truncation: float = 1.0
    ) -> torch.Tensor:
        """`num_images` images (N, C, H, W) in [0, 1] from noise seeded by `seed`, truncated by
        `truncation` (psi, 0..1: z' = psi * z; 1 changes nothing); conditional models draw
        class `label`, or cycle the classes if None or -1 (as the served model does)."""
        self._entry("sample")
        label = None if label == CYCLE else label
        with self._named():
            return to_images(self.generator, self.spec, num_images, seed, label, truncation)

    def interpolate(
        self,
        from_seed: int,
        to_seed: int,
        steps: int = 8,
        method: str = "slerp",
        label: int | None = None,
        truncation: float = 1.0,
    ) -> torch.Tensor:
        """`steps` frames (K, C, H, W) in [0, 1] from seed `from_seed`'s noise to `to_seed`'s,
        by `method` ("slerp" or "lerp"), truncated by `truncation`; the first and last frames
        are `sample(1, from_seed)` and `sample(1, to_seed)` with that label and truncation.
        Conditional models draw class `label` in every frame (None or -1: class 0)."""
        self._entry("sample")
        label = None if label == CYCLE else label
        with self._named():
            return interpolation_images(
                self.generator, self.spec, from_seed, to_seed, steps, method, label, truncation
            )

    def translate(self, image: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Image-to-image models: the output for an input image batch."""
        self._entry("translate")
        raise NotImplementedError("image_to_image generation is not implemented yet")

    def prompt(self, text: str, num_images: int = 1, seed: int = 0) -> torch.Tensor:
        """Text-to-image models: `num_images` images for a prompt."""
        self._entry("prompt")
        raise NotImplementedError("text_to_image generation is not implemented yet")

    def _entry(self, name: str) -> None:
        """Refuse a method that the model's task does not answer, naming the one that does."""
        expected = ENTRY_FOR[self.task.condition]
        if name != expected:
            takes = {"sample": "noise", "translate": "an image", "prompt": "a text"}
            raise TypeError(
                f"{self.model_uri} is a generator of task {self.task.name!r}, which takes "
                f"{takes[expected]}: use .{expected}(), not .{name}() (gan/tasks.py)"
            )

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except ValueError as exc:
            raise ValueError(f"{self.model_uri}: {exc}") from None


def load(model_uri: str, tracking_uri: str | None = None) -> LoadedGenerator:
    """The generator at `model_uri` (models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-...,
    runs:/..., a local model directory), checked as `load_generator_from_uri` does; without
    `tracking_uri`, MLflow's current tracking URI (`MLFLOW_TRACKING_URI` if set)."""
    generator, spec, info = load_generator_from_uri(model_uri, tracking_uri)
    return LoadedGenerator(generator, spec, info, model_uri)


@contextlib.contextmanager
def _refusals_as_registry_errors():
    """What a model refuses to answer (a ValueError) as the RegistryError the CLI reports."""
    try:
        yield
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def sample(
    model_uri: str,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
    tracking_uri: str | None = None,
    truncation: float = 1.0,
) -> torch.Tensor:
    """`num_images` images (N, C, H, W) in [0, 1] from the model at `model_uri` (see
    `LoadedGenerator.sample`); a request the model cannot answer is a RegistryError."""
    model = load(model_uri, tracking_uri)
    with _refusals_as_registry_errors():
        return model.sample(num_images, seed, label, truncation)


def image_format_problem(path: str | Path) -> str | None:
    """Why `save_images` cannot write `path` (its suffix), or None."""
    suffix = Path(path).suffix
    if suffix.lower() not in IMAGE_FORMATS:
        return (
            f"expected a .png (a grid) or a .gif (an animation) file name, not {suffix or 'none'}"
        )
    return None


def save_images(images: torch.Tensor, out: str | Path, nrow: int = 8, frame_ms: int = 100) -> Path:
    """Write images (N, C, H, W) in [0, 1] to `out`: a .png grid of `nrow` images per row
    (torchvision's), or a .gif with one frame per image, `frame_ms` milliseconds each, looping
    (Pillow merges identical consecutive frames into one longer frame). Written atomically: a
    reader never sees half a file."""
    problem = image_format_problem(out)
    if problem:
        raise ValueError(f"{out}: {problem}")
    with atomic_path(out) as tmp:
        if Path(out).suffix.lower() == ".png":
            from torchvision.utils import save_image

            save_image(images, tmp, nrow=nrow, format="png")
        else:
            _save_gif(images, tmp, frame_ms)
    return Path(out)


def _save_gif(images: torch.Tensor, path: Path, frame_ms: int) -> None:
    from PIL import Image

    # torchvision's rounding to 8 bits (save_image), one frame per image, channels last
    pixels = images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    frames = [
        Image.fromarray(p.squeeze(-1).numpy() if p.shape[-1] == 1 else p.numpy()) for p in pixels
    ]
    frames[0].save(
        path, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0
    )


def sample_grid(
    model_uri: str,
    out: str | Path,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
    params: Params | None = None,
    nrow: int = 8,
    truncation: float = 1.0,
) -> Path:
    """Write a PNG grid of samples to `out` (atomically: a reader never sees half a file)."""
    uri = params_tracking_uri(params) if params is not None else None
    images = sample(model_uri, num_images, seed, label, uri, truncation)
    return save_images(images, out, nrow=nrow)


def interpolation_file(
    model_uri: str,
    out: str | Path,
    from_seed: int,
    to_seed: int,
    steps: int = 8,
    method: str = "slerp",
    label: int | None = None,
    truncation: float = 1.0,
    params: Params | None = None,
    nrow: int | None = None,
    frame_ms: int = 100,
) -> Path:
    """Write the frames of `LoadedGenerator.interpolate` to `out`: a .png grid (`nrow` per row,
    default all in one row) or a .gif animation (`frame_ms` per frame); a request the model
    cannot answer is a RegistryError."""
    model = load(model_uri, params_tracking_uri(params) if params is not None else None)
    with _refusals_as_registry_errors():
        images = model.interpolate(from_seed, to_seed, steps, method, label, truncation)
    return save_images(images, out, nrow=nrow or len(images), frame_ms=frame_ms)
