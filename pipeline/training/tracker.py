"""What rank 0 records in the run's MLflow run while it trains: metrics, tags, sample grids and
system metrics. A worker without a run (untracked) gets a RunTracker of None, which records
nothing.

Sample grids are MLflow step images (`MlflowClient.log_image` with a key and a step), which
MLflow stores as run artifacts named

    images/<key>+step+<step>+timestamp+<ms>+<uuid>.png           the image as logged
    images/<key>+step+<step>+timestamp+<ms>+<uuid>+compressed.webp   a thumbnail for the UI

(a "/" in the key becomes "~") and marks the run with the tag `mlflow.loggedImages`. The UI's
image panel lists the run's images/ folder and parses these names into a step slider per key
(MLflow 3.17's image-path parser, which also accepts "%" for "+"); `image_steps` reads them
back the same way.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

PROGRESS_TAG = "ganpipe.progress"  # rank 0's latest report, for the driver's progress line
DIVERGED_TAG = "ganpipe.diverged_at_step"
DIVERGED_REASON_TAG = "ganpipe.diverged_reason"
SAMPLES_KEY = "samples"  # the image key of the in-loop sample grids
IMAGES_DIR = "images"  # where MLflow keeps a run's step images
_IMAGE_NAME = re.compile(  # <key>+step+<step>+timestamp+<ms>+<uuid>.png ("%" or "+")
    r"(?P<key>[^+%]+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%](?P<ms>\d+)[+%][^+%.]+\.png"
)


@dataclass(frozen=True)
class RunRef:
    """An MLflow run and the tracking server that holds it."""

    tracking_uri: str
    run_id: str


class RunTracker:
    def __init__(self, run: RunRef | None):
        self.run = run

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.run.tracking_uri)

    def log_metrics(self, metrics: dict, step: int, progress: dict | None = None) -> None:
        """The report's metrics at `step`, and (`progress`) the driver's progress line's text
        as a tag, in one call."""
        if self.run is None:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if k not in ("step", "diverged")
        ]
        tags = [RunTag(PROGRESS_TAG, json.dumps(progress))] if progress else []
        self._client().log_batch(self.run.run_id, metrics=batch, tags=tags)

    def tag(self, key: str, value: str) -> None:
        if self.run is not None:
            self._client().set_tag(self.run.run_id, key, value)

    def mark_diverged(self, step: int, reason: str) -> None:
        self.tag(DIVERGED_TAG, str(step))
        self.tag(DIVERGED_REASON_TAG, reason[:5000])

    def log_image(self, path: Path, key: str, step: int) -> None:
        """Log the image file `path` as MLflow step image `key` at `step` (the UI's slider)."""
        if self.run is None:
            return
        from mlflow import Image

        self._client().log_image(self.run.run_id, Image(str(path)), key=key, step=step,
                                 synchronous=True)  # fmt: skip

    def system_metrics(self):
        """MLflow's CPU/memory/GPU sampler on this node (every 10 s), or None if untracked."""
        if self.run is None:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run.run_id, sampling_interval=10, resume_logging=True,
            tracking_uri=self.run.tracking_uri,
        )  # fmt: skip
        monitor.start()
        return monitor


def image_steps(client, run_id: str, key: str) -> dict[int, str]:
    """{step: artifact path of the full-size image} of step image `key` in run `run_id`, read
    from the artifact listing the way MLflow's UI reads it (the newest image of a step wins)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in client.list_artifacts(run_id, IMAGES_DIR):
        match = _IMAGE_NAME.fullmatch(entry.path.rsplit("/", 1)[-1])
        if entry.is_dir or match is None or match["key"].replace("~", "/") != key:
            continue
        step, logged = int(match["step"]), (int(match["ms"]), entry.path)
        found[step] = max(found.get(step, logged), logged)
    return {step: path for step, (_, path) in sorted(found.items())}
