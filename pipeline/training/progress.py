"""The driver's progress line: for a single run from rank 0's progress tag in its MLflow run
(the one channel a driver shares with workers on any cluster), for a sweep from a Tune callback,
which Tune runs in the driver."""

from __future__ import annotations

import json
import math
import threading

from ray.tune import Callback

from pipeline.console import ProgressLine, training_text
from pipeline.training.tracker import PROGRESS_TAG

POLL_S = 2.0


class RunProgress:
    """While the body runs, show run `run_id`'s latest report (a context manager)."""

    def __init__(self, client, run_id: str, label: str, poll_s: float = POLL_S):
        self.client, self.run_id, self.poll_s = client, run_id, poll_s
        self.line = ProgressLine(label)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.shown = None

    def __enter__(self) -> RunProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()
        self.line.close()

    def _watch(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> None:
        try:
            tag = self.client.get_run(self.run_id).data.tags.get(PROGRESS_TAG)
        except Exception:  # a busy store: the next poll shows it
            return
        if tag and tag != self.shown:
            self.shown = tag
            self.line.update(training_text(json.loads(tag)))


class SweepProgress(Callback):
    """Trials running, ended (stopped early or completed), pending, and the best FID so far."""

    def __init__(self, label: str, steps: int):
        self.line, self.steps = ProgressLine(label), steps

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_experiment_end(self, trials, **info):
        self._show(trials)
        self.line.close()

    def _show(self, trials) -> None:
        self.line.update(sweep_text([(t.status, t.last_result or {}) for t in trials], self.steps))


def sweep_text(trials: list[tuple[str, dict]], steps: int) -> str:
    """The sweep's line from (Tune status, last result) per trial."""
    running = sum(status == "RUNNING" for status, _ in trials)
    pending = sum(status in ("PENDING", "PAUSED") for status, _ in trials)  # PAUSED: PBT
    ended = [r for status, r in trials if status in ("TERMINATED", "ERROR")]
    stopped = sum(r.get("step", 0) < steps for r in ended)
    fids = [r["fid_domain"] for _, r in trials if math.isfinite(r.get("fid_domain", math.inf))]
    text = (
        f"trials: {running} running, {len(ended) - stopped} completed, {stopped} stopped, "
        f"{pending} pending"
    )
    return text + (f" | best fid {min(fids):.2f}" if fids else "")
