"""The `register` stage: the best evaluated candidate into the MLflow Model Registry.

It ranks the evaluate stage's non-diverged candidates by `register.metric`, logs the winner's
exported generator as a pyfunc whose artifact holds data only (the safetensors weights and
their JSON spec; the MLmodel file names the installed `pipeline.generator_model` as its loader
module, so no code travels with the model), registers it with tags that identify it (the
digest of the generator's files, which every loader checks, weights sha256, dataset, params,
git commit, evaluation protocol and scores) with a description that says what it is (family,
task, raw or EMA weights, data version, primary metric), links the candidate's evaluation
figures to the version's logged model as its metrics (named as in the training run,
`eval.<figure>`, at the candidate's training step), so the Models view and
`MlflowClient.search_logged_models(order_by=[{"field_name": "metrics.eval.fid_domain"}])` rank
versions by them, and applies champion/challenger aliases: the new
version is the challenger, and also the champion when it beats the current one under the same
evaluation protocol. The same generator files (the same digest) registered again reuse their
version. `register.out_file` is written last, only once all of this worked.
"""

from __future__ import annotations

import contextlib
import logging
import time
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import AnyType

from gan.export import generator_digest, load_generator
from gan.models import GeneratorSpec
from pipeline.artifacts import (
    AUGMENT_REPORT,
    EVALUATE_REPORT,
    GENERATORS,
    is_score,
    read_stage_json,
)
from pipeline.config import RANKING_METRICS, Params, metric_extractor
from pipeline.errors import RegistryError
from pipeline.files import write_json
from pipeline.generator_model import DIGEST_KEY, DIGEST_TAG, LOADER_MODULE, open_registry
from pipeline.tracking import (
    experiment_id,
    git_commit,
    json_tag,
    mlflow_at,
    tracking_uri,
)

# What the served model imports besides ganpipe itself, pinned to the versions it was logged
# with (nothing inferred). ganpipe is not on PyPI: serve where it is installed.
REQUIREMENTS = ("mlflow", "torch", "safetensors", "numpy", "pandas")
TAG = "ganpipe."  # the prefix of every tag ganpipe sets (DIGEST_TAG too)
SHA_TAG = TAG + "weights_sha256"
PROTOCOL_ID_TAG = TAG + "protocol_id"
METRIC_TAG = TAG + "metric."
GENERATOR_TAG = TAG + "generator"  # ema or raw: which of the run's generators this is
REFRESHED = (TAG + "protocol", PROTOCOL_ID_TAG, TAG + "primary_metric", TAG + "generator_gap")
MODEL_METRIC = "eval."  # the prefix of the logged model's metrics, as in the training run
WEIGHTS_NAMES = {"ema": "EMA weights", "raw": "raw weights"}

log = logging.getLogger(__name__)


def register(params: Params) -> dict:
    """Register the best candidate, promote it if it beats the champion, write out_file."""
    cfg = params.register
    report = _with_augmentation(
        _read_evaluation(Path(params.evaluate.out_dir) / EVALUATE_REPORT), params
    )
    candidate, scores = best_candidate(report["candidates"], cfg.metric)
    directory = Path(params.evaluate.out_dir) / GENERATORS / candidate
    _, spec, info = load_generator(directory)  # the weights are the ones described
    digest = generator_digest(directory)
    sha, value = info["weights_sha256"], float(scores[cfg.metric])
    uri = tracking_uri(params)
    client = open_registry(uri)
    tags = _version_tags(candidate, scores, info, report["protocol"], cfg.metric, spec)
    tags[DIGEST_TAG] = digest
    description = _description(candidate, scores, cfg.metric, tags)
    try:
        version = _find_version(client, cfg.model_name, digest)
        if version is None:
            with mlflow_at(uri):  # log_model and create_model_version resolve through it
                run_id = scores.get("mlflow_run_id")
                model = _log_generator(client, params, directory, spec, digest, run_id, candidate)
                version = _new_version(client, cfg.model_name, model, tags, description)
            reused = ""
        else:  # the same weights: its scores follow this evaluation; provenance stays
            for key, tag in tags.items():
                if key in REFRESHED or key.startswith(METRIC_TAG):
                    client.set_model_version_tag(cfg.model_name, version.version, key, tag)
            client.update_model_version(cfg.model_name, version.version, description)
            reused = f"already registered as version {version.version}; "
        _link_metrics(client, version, scores)
        promoted, reason = _decide(client, params, version.version, value, tags[PROTOCOL_ID_TAG])
        client.set_registered_model_alias(cfg.model_name, cfg.challenger_alias, version.version)
        if promoted:
            client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
        aliases = client.get_model_version(cfg.model_name, version.version).aliases
    except MlflowException as exc:
        raise RegistryError(f"model registry {uri}: {exc.message}") from None
    summary = {
        "model_name": cfg.model_name,
        "version": int(version.version),
        "model_uri": f"models:/{cfg.model_name}/{version.version}",
        "aliases": sorted(aliases),
        "candidate": candidate,
        "metric": cfg.metric,
        "value": value,
        "promoted": promoted,
        "generator": tags[GENERATOR_TAG],
        "weights_sha256": sha,
        "generator_digest": digest,
        "message": reused + reason,
    }
    write_json(cfg.out_file, summary)
    return summary


def _read_evaluation(path: str | Path) -> dict:
    """The evaluate stage's report (protocol and per-candidate scores)."""
    report = read_stage_json(path, "evaluate", RegistryError)
    missing = [key for key in ("protocol", "candidates") if key not in report]
    if missing or "id" not in report.get("protocol", {}):
        raise RegistryError(
            f"{path} lacks {', '.join(missing) or 'protocol.id'}: not written by the evaluate "
            "stage of this version; re-run it"
        )
    return report


AUGMENT_FIGURES = ("augment_gain", "augment_gain_vs_classical", "augment_cas")


def _with_augmentation(report: dict, params: Params) -> dict:
    """The evaluation with the augment stage's figures added to its candidates (when that
    stage measured them), and the augment protocol among the protocol ids."""
    path = Path(params.augment.out_dir) / AUGMENT_REPORT
    if not path.is_file():
        return report
    augmented = read_stage_json(path, "augment", RegistryError)
    if not augmented.get("enabled"):
        return report
    candidates = {
        name: scores | {k: augmented["candidates"][name][k] for k in AUGMENT_FIGURES}
        if name in augmented.get("candidates", {}) else scores
        for name, scores in report["candidates"].items()
    }  # fmt: skip
    protocol = report["protocol"] | {
        "ids": report["protocol"]["ids"] | {"augment": augmented["protocol"]["id"]}
    }
    return report | {"candidates": candidates, "protocol": protocol}


def best_candidate(candidates: dict[str, dict], metric: str) -> tuple[str, dict]:
    """The non-diverged candidate with the best `metric` (RANKING_METRICS says which way)."""
    present = sorted({k for c in candidates.values() for k, v in c.items() if k in RANKING_METRICS})
    if metric not in present:
        raise RegistryError(
            f"register.metric {metric!r} is in no candidate's scores (present: "
            f"{', '.join(present) or 'none'}); set register.metric to one of them"
        )
    eligible = {
        name: c
        for name, c in candidates.items()
        if not c.get("diverged") and is_score(c.get(metric))
    }
    if not eligible:
        raise RegistryError(
            f"no candidate can be registered: all {len(candidates)} diverged or have no finite "
            f"{metric}; fix training (see the train stage's history) and re-run the pipeline"
        )
    sign = 1 if RANKING_METRICS[metric] == "min" else -1
    name = min(sorted(eligible), key=lambda n: sign * eligible[n][metric])
    return name, eligible[name]


def _figures(scores: dict) -> dict[str, float]:
    """The candidate's finite evaluation figures that can rank generators (RANKING_METRICS)."""
    return {k: float(v) for k, v in sorted(scores.items()) if k in RANKING_METRICS and is_score(v)}


def _version_tags(
    candidate: str, scores: dict, info: dict, protocol: dict, metric: str, spec: GeneratorSpec
) -> dict:
    """Everything that identifies the registered generator and how it was scored."""
    return {
        TAG + "candidate": candidate,
        TAG + "family": spec.family,
        TAG + "task": spec.task,
        TAG + "dataset_hash": info.get("dataset_hash") or protocol.get("dataset_hash", "unknown"),
        TAG + "git_commit": git_commit(),
        TAG + "params": json_tag(info.get("params", {})),
        TAG + "protocol": json_tag(protocol),
        # The protocol of the primary metric's feature extractor decides comparability.
        PROTOCOL_ID_TAG: protocol["ids"].get(metric_extractor(metric), "none"),
        SHA_TAG: info["weights_sha256"],
        TAG + "primary_metric": metric,
        GENERATOR_TAG: info.get("which", "unknown"),
        TAG + "generator_gap": scores.get("generator_choice", {}).get("gap", "not recorded"),
        **{METRIC_TAG + k: repr(v) for k, v in _figures(scores).items()},
    }


def _description(candidate: str, scores: dict, metric: str, tags: dict) -> str:
    """The model version's description (from its tags): what it is, its primary score and why
    this generator of the run, e.g. "dcgan class_conditional generator (EMA weights) of
    training run c, data 1a2b3c4d5e6f: fid_domain 12.3 (lower is better). ..."."""
    choice = scores.get("generator_choice", {})
    which = tags[GENERATOR_TAG]
    better = "lower" if RANKING_METRICS[metric] == "min" else "higher"
    text = (
        f"{tags[TAG + 'family']} {tags[TAG + 'task']} generator "
        f"({WEIGHTS_NAMES.get(which, which + ' weights')}) of training run {candidate}, "
        f"data {tags[TAG + 'dataset_hash'][:12]}: {metric} {float(scores[metric]):.4g} "
        f"({better} is better). Evaluate scored both the EMA and the raw generator "
        f"(rule: {choice.get('rule', '?')}); {choice.get('gap', 'no comparison recorded')}."
    )
    warning = "WARNING: the two generators differ a lot. " if choice.get("gap_flagged") else ""
    return warning + text


def _link_metrics(client: MlflowClient, version: ModelVersion, scores: dict) -> None:
    """The candidate's evaluation figures as metrics of the version's logged model, at its
    training step (logged through the version's run, whose `eval.*` metrics they repeat); the
    latest ones rank it."""
    model_id, run = logged_model_id(version), _get_run(client, version.run_id)
    if model_id is None or run is None or run.info.lifecycle_stage != "active":
        log.warning(
            "version %s has no logged model in an active run: its metrics are not linked",
            version.version,
        )
        return
    now, step = int(time.time() * 1000), int(scores.get("steps", 0))
    metrics = [
        Metric(MODEL_METRIC + k, v, now, step, model_id=model_id)
        for k, v in _figures(scores).items()
    ]
    client.log_batch(version.run_id, metrics=metrics)


def logged_model_id(version: ModelVersion) -> str | None:
    """The id of the logged model behind a model version, or None for a version registered
    from a run's artifacts (a sqlite registry keeps the id only in the source `models:/<id>`)."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _find_version(client: MlflowClient, name: str, digest: str) -> ModelVersion | None:
    """The version of model `name` that already holds the generator files of `digest` (one
    registered before digests, whose artifact ships code, is not reused), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _signature(spec: GeneratorSpec) -> ModelSignature:
    """Requests (num_images, seed, optional label rows) -> images (N, C, H, W) in [0, 1].

    The columns are typed `any`: MLflow would cast a declared `long` column (2.5 -> 2,
    true -> 1, "3" -> 3) before the model sees it; the model checks each value itself."""
    request = spec.task_entry.request  # what a request of the task carries (gan.tasks)
    inputs = Schema([ColSpec(AnyType(), f.name, required=f.required) for f in request])
    shape = (-1, spec.channels, spec.resolution, spec.resolution)
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), shape)]))


def _get_run(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


@contextlib.contextmanager
def _model_run(client: MlflowClient, params: Params, run_id: str | None, candidate: str):
    """The candidate's training run when the store has it, left in the state it was in; else
    a new run in `tracking.experiment`."""
    existing = _get_run(client, run_id)
    if existing is not None:
        try:
            with mlflow.start_run(run_id=run_id):
                yield
        finally:
            client.update_run(run_id, status=existing.info.status)
        return
    experiment = experiment_id(client, params.tracking.experiment)
    tags = {TAG + "candidate": candidate, TAG + "git_commit": git_commit()}
    with mlflow.start_run(experiment_id=experiment, run_name=f"register-{candidate}", tags=tags):
        yield


def _log_generator(
    client: MlflowClient,
    params: Params,
    directory: Path,
    spec: GeneratorSpec,
    digest: str,
    run_id: str | None,
    candidate: str,
) -> ModelInfo:
    """Log the exported generator as a data-only pyfunc (a LoggedModel) whose loader is the
    installed LOADER_MODULE; the digest goes into the tracking store (the logged model's tag,
    set before MLflow validates the input example by loading the model) and MLmodel."""
    requirements = [f"{p}=={installed_version(p).split('+')[0]}" for p in REQUIREMENTS]
    with _model_run(client, params, run_id, candidate):
        info = mlflow.pyfunc.log_model(
            name=candidate,
            loader_module=LOADER_MODULE,
            data_path=str(directory),
            signature=_signature(spec),
            input_example=pd.DataFrame([{"num_images": 2, "seed": 0}]),
            pip_requirements=requirements,
            metadata={DIGEST_KEY: digest},
            tags={DIGEST_TAG: digest},
        )
    flavor = info.flavors["python_function"]
    if flavor.get("loader_module") != LOADER_MODULE or flavor.get("code"):
        raise RegistryError(f"{info.model_uri} was logged with code in its artifact; refusing it")
    return info


def _new_version(
    client: MlflowClient, name: str, model: ModelInfo, tags: dict, description: str
) -> ModelVersion:
    """A new version of registered model `name` (created if needed) for the logged model."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    return client.create_model_version(
        name, model.model_uri, run_id=model.run_id, tags=tags, model_id=model.model_id,
        description=description,
    )  # fmt: skip


def _decide(client: MlflowClient, params: Params, version: str, value: float, protocol_id: str):
    """(promote to champion?, why): only over no champion, or a worse one scored the same way."""
    cfg, metric = params.register, params.register.metric
    stays = f"stays {cfg.challenger_alias}"
    aliases = client.get_registered_model(cfg.model_name).aliases
    if cfg.alias not in aliases:
        return True, f"promoted to {cfg.alias}: there was no {cfg.alias}"
    current = aliases[cfg.alias]
    if str(current) == str(version):
        return True, f"stays {cfg.alias}: it already is the {cfg.alias}"
    tags = client.get_model_version(cfg.model_name, current).tags
    by_hand = (
        f'to promote it by hand: python -c "from mlflow import MlflowClient; '
        f"MlflowClient('{client.tracking_uri}').set_registered_model_alias("
        f"'{cfg.model_name}', '{cfg.alias}', {version})\""
    )
    theirs = tags.get(PROTOCOL_ID_TAG, "none")
    if theirs != protocol_id:
        return False, (
            f"{stays}: {cfg.alias} version {current} was evaluated under protocol "
            f"{theirs[:12]}, this one under {protocol_id[:12]}, so their scores are not "
            f"comparable; re-evaluate both under one protocol, or {by_hand}"
        )
    if METRIC_TAG + metric not in tags:
        return False, f"{stays}: {cfg.alias} version {current} has no {metric}; {by_hand}"
    old = float(tags[METRIC_TAG + metric])
    lower_is_better = RANKING_METRICS[metric] == "min"
    if value < old if lower_is_better else value > old:
        sign = "<" if lower_is_better else ">"
        return True, (
            f"promoted to {cfg.alias}: {metric} {value:.4g} {sign} {old:.4g} of version {current}"
        )
    return False, (
        f"{stays}: {metric} {value:.4g} is not better than {old:.4g} of {cfg.alias} "
        f"version {current}"
    )
