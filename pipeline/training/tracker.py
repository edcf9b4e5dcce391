"""What rank 0 records in the run's MLflow run while it trains: metrics, tags, sample grids and
system metrics. A worker without a run (untracked) gets `UNTRACKED`, which records nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROGRESS_TAG = "ganpipe.progress"  # rank 0's latest report, for the driver's progress line
DIVERGED_TAG = "ganpipe.diverged_at_step"
DIVERGED_REASON_TAG = "ganpipe.diverged_reason"


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

    def log_artifact(self, path: Path, name: str) -> None:
        """Log `path` under the artifact path `name` (directory/filename)."""
        if self.run is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(name).name
            shutil.copy(path, target)
            self._client().log_artifact(self.run.run_id, str(target), str(Path(name).parent))

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
