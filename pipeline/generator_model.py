"""The registered generator as an MLflow pyfunc whose artifact holds data only.

The register stage logs a model whose MLmodel file names this module as the python_function
`loader_module` (no `code`, no `python_model`): MLflow imports it from the installed ganpipe
package and calls `_load_pyfunc` with the model's data directory, the exported generator
(safetensors + JSON, see gan/export.py). Nothing executable travels with the model, and
`check_data_only` refuses a model directory that holds anything but data or names another
loader. The files are then checked against the digest the tracking store pins for the model
(`trusted_digest`) before a byte of them is parsed. docs/models.md states the trust model.

Request: a DataFrame with columns num_images, seed and the optional label, truncation,
interpolate_to_seed and interpolation (the task's `request` in gan/tasks.py); each row asks for
`num_images` images from noise seeded by `seed`, all of class `label` (conditional models;
-1, or no label column, cycles through the classes), truncated by `truncation` (psi, 0..1;
1, or no column, changes nothing). A row with `interpolate_to_seed` asks instead for
`num_images` (>= 2) frames from `seed`'s noise to that seed's, by `interpolation` ("slerp",
the default, or "lerp"), all of class `label` (-1: class 0). Counts, seeds and labels must be
integers (not a bool, a float or a string), truncation a number; an optional column present in
one record must be in every record. Every row is checked, and the total (at most MAX_IMAGES),
before any image is generated. Response: float32 array (N, C, H, W) in [0, 1], the rows'
images one after another.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient

from gan.export import ExportError, load_generator
from gan.models import GeneratorSpec
from gan.sampling import INTERPOLATIONS, check_truncation, generate, interpolate
from pipeline.errors import RegistryError
from pipeline.tracking import TrackingError, check_reachable

log = logging.getLogger(__name__)

# The module MLflow imports to load a registered generator: this one, from the installed
# ganpipe package, never code from the artifact (its MLmodel has no `code`, no `python_model`).
LOADER_MODULE = "pipeline.generator_model"
# The digest of the generator's files (gan.export.generator_digest): a tag on the model version
# and on the logged model, in the tracking store, where the artifact store cannot change it.
DIGEST_TAG = "ganpipe.generator_digest"
DIGEST_KEY = "ganpipe_generator_digest"  # the same digest in the MLmodel metadata (alongside)

MAX_IMAGES = 1024  # per request: bounds the memory and time one request can take
CYCLE = -1  # the label value that means "cycle through the classes"
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # what torch.Generator.manual_seed takes
# A ganpipe model directory holds MLmodel, the YAML that MLflow writes when it downloads a
# models:/ URI, and files with these suffixes, nothing else: no Python, no pickle, no native
# library that a loader could be talked into running.
DATA_NAMES = ("MLmodel", "registered_model_meta")
DATA_SUFFIXES = (".json", ".safetensors", ".yaml", ".txt")
PYFUNC = "python_function"
CODE_KEYS = ("code", "python_model", "model_code_path", "cloudpickle_version")


def check_data_only(model_dir: Path, where: str) -> tuple[Path, Model]:
    """The generator's data directory inside MLflow model `model_dir`, and its MLmodel, once
    they are known to be what the register stage logs: the installed loader module, no code
    in the flavor and no file but data in the directory. `where` names the model in errors."""
    try:
        model = Model.load(model_dir)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{where} is not an MLflow model ({exc})") from None
    flavor = model.flavors.get(PYFUNC, {})
    loader = flavor.get("loader_module")
    code = [key for key in CODE_KEYS if flavor.get(key)]
    if loader != LOADER_MODULE or code:
        raise RegistryError(
            f"{where} is not a data-only ganpipe model (its MLmodel names loader "
            f"{loader!r}{' and ' + ', '.join(code) if code else ''}; expected loader "
            f"{LOADER_MODULE!r} and no code): it was logged by an older ganpipe, whose models "
            "ship code, or changed after registration; re-register it with `ganpipe register`"
        )
    files = sorted(p for p in model_dir.rglob("*") if not p.is_dir())
    foreign = [
        p.relative_to(model_dir).as_posix()
        for p in files
        if not p.is_file() or (p.name not in DATA_NAMES and p.suffix not in DATA_SUFFIXES)
    ]
    if foreign:
        raise RegistryError(
            f"{where} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
            "ganpipe never loads: a ganpipe model is data only (MLmodel, JSON, YAML, text and "
            "safetensors files), so it was changed after registration; refusing it"
        )
    data = (model_dir / str(flavor.get("data", ""))).resolve()
    if not data.is_relative_to(model_dir.resolve()) or data == model_dir.resolve():
        raise RegistryError(f"{where}: its MLmodel's data path {flavor.get('data')!r} is invalid")
    return data, model


def open_registry(uri: str, must_exist: bool = False) -> MlflowClient:
    """A client for the registry at `uri`, once it is known to be a registry that answers;
    `must_exist`: an sqlite file that is not there is an error, not a new empty registry."""
    scheme = uri.partition(":")[0].partition("+")[0]
    if scheme not in (*DATABASE_ENGINES, "http", "https"):
        raise RegistryError(
            f"{uri} cannot hold an MLflow Model Registry (it needs a database or a tracking "
            "server); set tracking.uri to sqlite:///mlflow.db or MLFLOW_TRACKING_URI to a server"
        )
    database = uri.removeprefix("sqlite:///")
    if must_exist and scheme == "sqlite" and not Path(database).is_file():
        raise RegistryError(
            f"there is no model registry at {uri} ({database} does not exist); run "
            "`ganpipe register` first, or point MLFLOW_TRACKING_URI at the registry"
        )
    try:
        check_reachable(uri)
    except TrackingError as exc:
        raise RegistryError(f"model registry: {exc}") from None
    return MlflowClient(uri, registry_uri=uri)


def logged_model_digest(client: MlflowClient, model_id: str) -> str | None:
    """The digest the tracking store pins for logged model `model_id` (None if it has no such
    model or no digest tag)."""
    try:
        return client.get_logged_model(model_id).tags.get(DIGEST_TAG)
    except MlflowException as exc:
        if exc.error_code == MlflowException("", RESOURCE_DOES_NOT_EXIST).error_code:
            return None
        raise RegistryError(f"tracking store {client.tracking_uri}: {exc.message}") from None


def _store(uri: str) -> MlflowClient | None:
    """A client for the tracking store at `uri`; None when it is an sqlite file that does not
    exist (there is no store to ask, and asking would create an empty one)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return open_registry(uri)


def trusted_digest(model: Model, where: str, tracking_uri: str) -> str:
    """The digest to check a model's files against: the tag the tracking store at
    `tracking_uri` holds for the MLmodel's logged model; failing that, the digest stored
    alongside in the MLmodel metadata, with a warning that says what was not verified."""
    client = _store(tracking_uri)
    if client is not None and model.model_id:
        pinned = logged_model_digest(client, model.model_id)
        if pinned:
            return pinned
    own = (model.metadata or {}).get(DIGEST_KEY)
    if not own:
        raise RegistryError(
            f"{where}: no digest pinned for it (logged model {model.model_id} has no tag "
            f"{DIGEST_TAG} in {tracking_uri}) and none in its MLmodel metadata ({DIGEST_KEY}), "
            "so its files cannot be checked; register it with `ganpipe register`"
        )
    known = "there is no tracking store at" if client is None else "no digest for it in"
    log.warning(
        "%s: checked only against the digest in its own MLmodel file (%s %s, logged model %s): "
        "nothing ties these files to a registered version, so a consistent swap of weights, "
        "spec and MLmodel would pass; load it as models:/NAME@ALIAS, or set "
        "MLFLOW_TRACKING_URI to the registry it came from, to verify it",
        where, known, tracking_uri, model.model_id,
    )  # fmt: skip
    return own


def load_checked(data_dir: Path, digest: str, where: str):
    """The generator, spec and description in `data_dir`, whose files must hash to `digest`."""
    try:
        return load_generator(data_dir, digest)
    except ExportError as exc:
        raise RegistryError(f"{where}: {exc}") from None


def _count(value, what: str, low: int, high: int) -> int:
    """`value` as an int if it is a whole number (not a bool, float or string) in low..high."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if _missing(value):  # a record lacks it
            raise ValueError(f"{what} is missing: give it in every record")
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {value}")
    return int(value)


def _missing(value) -> bool:
    """A value a record lacks: None (JSON null), or the NaN pandas fills in for a column that
    another record has."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# What a message about a record lacking an optional column adds
GIVE_IT = {
    "label": " (a label of -1 cycles through the classes)",
    "truncation": " (1 changes nothing)",
    "interpolate_to_seed": " (a request interpolates in every record or in none)",
    "interpolation": " (a request interpolates in every record or in none)",
}


def _check_complete(model_input: pd.DataFrame, spec: GeneratorSpec) -> None:
    """Every optional column that some record gives is in every record: pandas would fill the
    gaps with NaN and turn the column's integers into floats (3 -> 3.0)."""
    for field in spec.task_entry.request:
        if field.required or field.name not in model_input.columns:
            continue
        gaps = [i for i, value in enumerate(model_input[field.name]) if _missing(value)]
        if gaps:
            raise ValueError(
                f"record {gaps[0]}: {field.name} is missing: give it in every record"
                f"{GIVE_IT.get(field.name, '')}"
            )


@dataclass(frozen=True)
class Request:
    """One record of a request, checked: what `answer` generates."""

    num_images: int  # images, or frames of an interpolation
    seed: int
    label: int | None = None  # None: cycle the classes (an interpolation: class 0)
    truncation: float = 1.0  # psi; 1 changes nothing
    to_seed: int | None = None  # interpolate from `seed` to this seed's noise
    method: str = "slerp"  # how (gan.sampling.INTERPOLATIONS)


def _truncation(record: dict, where: str) -> float:
    try:
        return check_truncation(record.get("truncation", 1.0))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _interpolation(record: dict, where: str, number: int) -> tuple[int | None, str]:
    """(to_seed or None, method) of a record."""
    method = record.get("interpolation", "slerp")
    if "interpolate_to_seed" not in record:
        if "interpolation" in record:
            raise ValueError(
                f"{where}: interpolation {method!r} given without interpolate_to_seed (the "
                "seed to interpolate to)"
            )
        return None, method
    to_seed = _count(record["interpolate_to_seed"], f"{where}: interpolate_to_seed", *SEED_RANGE)
    if not isinstance(method, str) or method not in INTERPOLATIONS:
        raise ValueError(
            f"{where}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {method!r}"
        )
    if number < 2:
        raise ValueError(
            f"{where}: an interpolation needs num_images of at least 2 (its frames, seed and "
            f"interpolate_to_seed included), got {number}"
        )
    return to_seed, method


def check_requests(model_input: pd.DataFrame, spec: GeneratorSpec) -> list[Request]:
    """The Request of every row, once every row and the total are known to be answerable;
    ValueError naming the record and the value otherwise."""
    required = [f.name for f in spec.task_entry.request if f.required]
    missing = [c for c in required if c not in model_input.columns]
    if missing:
        raise ValueError(
            f"missing column(s) {', '.join(missing)}: each record has num_images, seed and "
            "(optional) label, truncation, interpolate_to_seed, interpolation"
        )
    _check_complete(model_input, spec)
    top = spec.num_classes - 1
    rows, total = [], 0
    for i, record in enumerate(model_input.to_dict("records")):
        where = f"record {i}"
        number = _count(record["num_images"], f"{where}: num_images", 1, MAX_IMAGES)
        seed = _count(record["seed"], f"{where}: seed", *SEED_RANGE)
        label = _count(record.get("label", CYCLE), f"{where}: label", CYCLE, SEED_RANGE[1])
        if label != CYCLE and spec.num_classes == 0:
            raise ValueError(
                f"{where}: label {label} given, but this generator is unconditional (no "
                "classes); send -1 or no label column"
            )
        if label > top:
            raise ValueError(
                f"{where}: label {label} is outside the model's classes 0..{top} (-1 cycles)"
            )
        truncation = _truncation(record, where)
        to_seed, method = _interpolation(record, where, number)
        total += number
        label = None if label == CYCLE else label
        rows.append(Request(number, seed, label, truncation, to_seed, method))
    if not 1 <= total <= MAX_IMAGES:
        raise ValueError(
            f"the request asks for {total} images in {len(rows)} records; between 1 and "
            f"{MAX_IMAGES} per request"
        )
    return rows


def _check_label(spec: GeneratorSpec, label: int | None) -> None:
    if label is not None and spec.num_classes == 0:
        raise ValueError(f"label {label} given, but this generator is unconditional (no classes)")


def to_images(
    generator: torch.nn.Module,
    spec: GeneratorSpec,
    num_images: int,
    seed: int = 0,
    label: int | None = None,
    truncation: float = 1.0,
) -> torch.Tensor:
    """`num_images` images (N, C, H, W) in [0, 1] from seed-fixed noise, truncated by
    `truncation` (psi, 0..1; 1 changes nothing); ValueError for a request the model cannot
    answer (too many images, a label it does not know, psi out of range)."""
    num_images = _count(num_images, "num_images", 1, MAX_IMAGES)
    _check_label(spec, label)
    images = generate(
        generator, num_images, spec.z_dim, spec.num_classes, seed, label, truncation=truncation
    )
    return ((images + 1) / 2).clamp(0, 1)


def interpolation_images(
    generator: torch.nn.Module,
    spec: GeneratorSpec,
    from_seed: int,
    to_seed: int,
    steps: int,
    method: str = "slerp",
    label: int | None = None,
    truncation: float = 1.0,
) -> torch.Tensor:
    """`steps` frames (K, C, H, W) in [0, 1] from seed `from_seed`'s noise to `to_seed`'s
    (gan.sampling.interpolate: the ends are `to_images(..., 1, seed)` of either seed); one
    class `label` in every frame of a conditional model (None: class 0)."""
    steps = _count(steps, "interpolation steps", 2, MAX_IMAGES)
    _check_label(spec, label)
    images = interpolate(
        generator, spec.z_dim, spec.num_classes, from_seed, to_seed, steps, method, label,
        truncation,
    )  # fmt: skip
    return ((images + 1) / 2).clamp(0, 1)


def answer(generator: torch.nn.Module, spec: GeneratorSpec, request: Request) -> torch.Tensor:
    """The images of one checked request record."""
    if request.to_seed is None:
        return to_images(
            generator, spec, request.num_images, request.seed, request.label, request.truncation
        )
    return interpolation_images(
        generator, spec, request.seed, request.to_seed, request.num_images, request.method,
        request.label, request.truncation,
    )  # fmt: skip


class GeneratorModel:
    """Samples images from a checked generator (what `_load_pyfunc` returns to MLflow)."""

    def __init__(self, generator: torch.nn.Module, spec: GeneratorSpec):
        self.generator, self.spec = generator, spec

    def predict(self, model_input: pd.DataFrame, params=None) -> np.ndarray:
        try:
            rows = check_requests(pd.DataFrame(model_input), self.spec)
            chunks = [answer(self.generator, self.spec, row) for row in rows]
        except ValueError as exc:  # a request this model cannot answer: HTTP 400 when served
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        return torch.cat(chunks).numpy()  # float32, as `generate` returns


def _load_pyfunc(data_path: str) -> GeneratorModel:
    """MLflow's entry point (`mlflow.pyfunc.load_model`, `mlflow models serve`): the model
    directory is checked to be data only, and its files against the trusted digest."""
    data = Path(data_path)
    model_dir = data.parent.parent  # MLflow puts the data directory at data/<name>
    where = f"MLflow model {model_dir}"
    checked, model = check_data_only(model_dir, where)
    if checked != data.resolve():
        raise RegistryError(f"{where}: MLflow loads {data}, its MLmodel names {checked}")
    digest = trusted_digest(model, where, mlflow.get_tracking_uri())
    generator, spec, _ = load_checked(checked, digest, where)
    _warn_of_dropped_columns(model, spec, where)
    return GeneratorModel(generator, spec)


def _warn_of_dropped_columns(model: Model, spec: GeneratorSpec, where: str) -> None:
    """Say so when the model's signature lacks request columns of its task (a version logged
    before they existed): MLflow drops such columns from a request before the model sees it."""
    if model.signature is None:
        return
    known = set(model.signature.inputs.input_names())
    lacking = [f.name for f in spec.task_entry.request if f.name not in known]
    if lacking:
        log.warning(
            "%s: its signature predates the request column(s) %s, so MLflow drops them from "
            "requests and they have no effect (the images are as if they were not sent); a "
            "version registered by this ganpipe takes them",
            where, ", ".join(lacking),
        )  # fmt: skip
