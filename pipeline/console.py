"""What a person watching a stage sees: one progress line per stage and run, not the libraries'
routine logging.

On a terminal the line updates in place; when output goes to a file or a pipe (CI, `ray job
submit` logs) the same text comes as plain lines, at most one per `PLAIN_EVERY_S` seconds,
plus the last one. Ray's per-rank report dumps and Ray/MLflow INFO lines are off unless
GANPIPE_VERBOSE=1 (or `ganpipe --verbose`); warnings and errors always show.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

VERBOSE_ENV = "GANPIPE_VERBOSE"
PLAIN_EVERY_S = 30.0
QUIET_LOGGERS = ("mlflow", "ray", "alembic", "urllib3", "torch_fidelity")
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def library_log_level() -> str:
    """The level of the libraries' logging: INFO when verbose, else WARNING."""
    return "INFO" if verbose() else "WARNING"


def quiet_libraries(level: str | None = None) -> None:
    """Hold the libraries' logging in this process (and the processes it starts) to `level`
    (default: library_log_level()). MLflow sets its logger's level when it is imported, from
    MLFLOW_LOGGING_LEVEL; Ray Train logs every report at INFO ("Reporting training result N:
    TrainingReport(...) from rank R") through a logger named after its file, outside the
    `ray.train` logger that Train's own log level governs."""
    level = level or library_log_level()
    os.environ[MLFLOW_LEVEL_ENV] = level
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and "/ray/" in name:
            logger.setLevel(level)


def say(stage: str, text: str) -> None:
    """One line of a stage's news, on stderr (stdout stays for results)."""
    print(f"{stage}: {text}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """3.2 s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLine:
    """A line that a stage rewrites as it goes: in place on a terminal, plain lines otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S):
        self.label, self._stream, self.every_s = label, stream, every_s
        self.last_text, self.last_shown, self.width = "", -float("inf"), 0

    @property
    def stream(self) -> TextIO:
        """sys.stderr as it is when written to (the object is pickled with Tune's state)."""
        return self._stream or sys.stderr

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    def update(self, text: str) -> None:
        self.last_text = text
        line = f"{self.label}: {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
        elif time.monotonic() - self.last_shown >= self.every_s:
            self._plain(line)

    def close(self, text: str | None = None) -> None:
        """End the line with `text` (default: the last update), shown in every mode."""
        text = self.last_text if text is None else text
        if self.tty:
            if text:
                self.stream.write("\r" + f"{self.label}: {text}".ljust(self.width))
            self.stream.write("\n")
            self.stream.flush()
        elif text:
            self._plain(f"{self.label}: {text}")

    def _plain(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self.last_shown = time.monotonic()


def training_text(report: dict) -> str:
    """steps done of total, images/s, ETA and the latest losses, from a rank-0 report."""
    step, steps = report["step"], report["steps"]
    parts = [f"step {step:,}/{steps:,} ({100 * step / max(steps, 1):.0f}%)"]
    if report.get("images_per_s"):
        parts.append(f"{report['images_per_s']:,.0f} img/s")
    if report.get("eta_s") is not None and step < steps:
        parts.append(f"ETA {duration(report['eta_s'])}")
    losses = [f"{k} {report[k]:.3f}" for k in ("loss_d", "loss_g") if k in report]
    if "fid_domain" in report:
        losses.append(f"fid {report['fid_domain']:.2f}")
    return " | ".join(parts + ([" ".join(losses)] if losses else []))
