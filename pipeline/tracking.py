"""MLflow tracking for the stages: where the store is, and one run per training run.

The embedded default is a sqlite store (`tracking.uri`) and artifacts next to it, both in the
repository and ignored by git; MLFLOW_TRACKING_URI points the stages at a server instead. A
relative sqlite path is made absolute here, because Ray workers run in other directories.

A training run's MLflow run is reopened only to continue it: when its checkpoint is resumed and
the run is unfinished (RUNNING, KILLED, FAILED). A FINISHED run is never reopened (a registered
model version points at it; its status, metrics and samples are its provenance): a run trained
on from its checkpoint is a new MLflow run tagged with the one it continues. Every run records
the process that holds it open (DRIVER_TAG); a RUNNING run whose process on this machine is gone
(a driver killed with SIGKILL) is marked KILLED by the next run that starts in its experiment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import Params

REACH_TIMEOUT_S = 5
# Tag values were VARCHAR(5000) until MLflow 3.2 (migration bda7b8c39065): stay under it so
# that older tracking servers accept our tags too.
TAG_VALUE_LIMIT = 5000


RUN_NAME_TAG = "ganpipe.run_name"
DRIVER_TAG = "ganpipe.driver"  # host:pid:start time of the process that holds the run open
RESUMED_FROM_TAG = "ganpipe.resumed_from_run"  # the FINISHED run this one continues training
CLOSED_TAG = "ganpipe.closed_reason"  # why a run was closed by another process
UNFINISHED = ("RUNNING", "SCHEDULED", "KILLED", "FAILED")


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


def driver_id() -> str:
    """This process, as DRIVER_TAG records it: host, pid and start time (pids are reused)."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def driver_gone(tag: str) -> bool:
    """Whether the process a DRIVER_TAG names has ended; False when unknown (another machine,
    or a tag this version did not write)."""
    import psutil

    parts = tag.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return False
    try:
        pid, started = int(parts[1]), float(parts[2])
        return abs(psutil.Process(pid).create_time() - started) > 1  # a new process, same pid
    except psutil.NoSuchProcess:
        return True
    except (ValueError, psutil.Error):
        return False


def close_abandoned_runs(client, experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment` whose driver on this machine is gone (it
    was killed with SIGKILL, or the machine went down); their ids."""
    closed = []
    running = client.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000)
    for run in running:
        tag = run.data.tags.get(DRIVER_TAG)
        if tag and driver_gone(tag):
            client.set_tag(
                run.info.run_id, CLOSED_TAG,
                f"its driver ({tag}) ended without closing it; marked KILLED by {driver_id()} "
                f"at {time.strftime('%Y-%m-%d %H:%M:%S')}",
            )  # fmt: skip
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def unfinished_run(client, experiment: str, query: str):
    """The newest run matching `query` that may be continued (not FINISHED), or None."""
    found = client.search_runs(
        [experiment], query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return found[0] if found and found[0].info.status in UNFINISHED else None


def reopen_run(client, run_id: str, clear_tags=()) -> None:
    """Continue an unfinished run in this process: RUNNING again, this driver recorded."""
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":  # the provenance of what it produced
        raise TrackingError(f"MLflow run {run_id} is FINISHED and is never reopened")
    for tag in clear_tags:
        if tag in run.data.tags:
            client.delete_tag(run_id, tag)
    client.set_tag(run_id, DRIVER_TAG, driver_id())
    client.update_run(run_id, status="RUNNING")


def candidate_runs(client, candidates: dict[str, dict]):
    """(name, result, run id) of each candidate whose MLflow training run is in `client`'s
    store; one without a run id is skipped, one whose run is missing with a warning."""
    from mlflow.exceptions import MlflowException

    for name, result in candidates.items():
        run_id = result["mlflow_run_id"]
        if not run_id:
            continue
        try:
            client.get_run(run_id)
        except MlflowException:
            logging.getLogger(__name__).warning(
                "MLflow run %s of %s is not in %s: not logged", run_id, name, client.tracking_uri
            )
            continue
        yield name, result, run_id
