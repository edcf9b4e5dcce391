"""MLflow tracking for the stages: where the store is, and one run per training run.

The embedded default is a sqlite store (`tracking.uri`) and artifacts next to it, both in the
repository and ignored by git; MLFLOW_TRACKING_URI points the stages at a server instead. A
relative sqlite path is made absolute here, because Ray workers run in other directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import Params

REACH_TIMEOUT_S = 5
# Tag values were VARCHAR(5000) until MLflow 3.2 (migration bda7b8c39065): stay under it so
# that older tracking servers accept our tags too.
TAG_VALUE_LIMIT = 5000


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message says which URI and what to check."""


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI if set, else params; sqlite paths made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def artifact_location(uri: str) -> str | None:
    """For the embedded sqlite store: artifacts in `mlartifacts/` beside the database, as an
    absolute URI (workers write from other directories). A server chooses its own."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).parent / "mlartifacts").as_uri()


def check_reachable(uri: str) -> None:
    """Fail in seconds, not minutes, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACH_TIMEOUT_S)
    except (urllib.error.URLError, OSError) as exc:
        source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it, or set {source} "
            "(where this URI came from) to another server or to sqlite:///mlflow.db, the "
            "embedded store"
        ) from None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created (artifacts beside a sqlite store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location(client.tracking_uri))


@contextlib.contextmanager
def mlflow_at(uri: str):
    """MLflow's fluent API and URI resolvers (start_run, log_model, downloads of models:/ and
    runs:/ URIs) read the global tracking URI: point it at `uri` for a block only, leaving
    the global and MLFLOW_TRACKING_URI (which set_tracking_uri also sets) as they were."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def json_tag(value) -> str:
    """`value` as compact JSON for an MLflow tag, or a note saying it was too long."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(text) <= TAG_VALUE_LIMIT:
        return text
    return json.dumps({"omitted": f"{len(text)} characters; see the model's generator.json"})
