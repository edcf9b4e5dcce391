"""The DVC metrics files: per stage, only the figures that compare across commits and
experiments, under short names, so that `dvc metrics show` of the default pipeline is one
table a person can read in 120 columns and `dvc metrics diff` shows changed figures alone.

DVC shows one row per metrics file and one column per (flattened) key, the union over all
files. So the files share a vocabulary (`fid`, `is`, `seconds`, ...) and the evaluate stage
writes one file per candidate into a directory: a sweep's candidates add rows, not columns.

    metrics/featurenet.json       accuracy (held-out), seconds (training)
    models/train/metrics.json     images/s (last report) | a sweep: steps (all trials' together)
    metrics/evaluate/c1.json ...  a candidate's chosen generator: fid, is, kid, precision,
                                  recall, coverage, seconds; where the task has them accuracy
                                  (samples showing their class), cas, fid_class (per-class
                                  mean); Inception's figures under `inception.`
    metrics/evaluate/real.json    the real data: fid (test vs train: the floor), is, seconds

Unsuffixed figures are the featurenet's (`*_domain` elsewhere). `c<i>` is the i-th candidate
of the train stage's result.json (a sweep's best trial first), so an experiment that trains
another run compares with the same key; the names, the protocol, the choice of generator and
every other figure are in the stages' non-metric outputs (models/evaluate/report.json,
models/train/result.json, models/featurenet/featurenet.json). Figures are rounded to
FIGURE_DIGITS significant digits (the full values are in those files); non-finite ones (a
diverged candidate's) are left out.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipeline.artifacts import is_score
from pipeline.files import check_output_dir, replace_dir, staging_dir, write_json

FIGURE_DIGITS = 4  # significant digits: FID's run-to-run noise is far above the fourth
# The evaluate stage's figure names (without the extractor suffix) -> the metrics' names.
SHORT_NAMES = {
    "fid": "fid",
    "is": "is",
    "kid": "kid",
    "precision": "precision",
    "recall": "recall",
    "class_coverage": "coverage",
    "label_accuracy": "accuracy",
    "fid_class_mean": "fid_class",
}
EXTRACTOR_LEVELS = {"domain": None, "inception": "inception"}  # None: at the top level
REAL = "real"  # metrics/evaluate/real.json
CANDIDATE_FILE = re.compile(r"c[1-9][0-9]*\.json|(real|classic)\.json")  # evaluate, augment


def figure(value) -> float | int | None:
    """`value` rounded to FIGURE_DIGITS significant digits; None if it is not a finite number."""
    if not is_score(value):
        return None
    return value if isinstance(value, int) else float(f"{value:.{FIGURE_DIGITS}g}")


def _figures(pairs) -> dict:
    """The (name, value) pairs whose value is a finite number, rounded."""
    return {k: v for k, v in ((k, figure(v)) for k, v in pairs) if v is not None}


def featurenet_metrics(report: dict) -> dict:
    """metrics/featurenet.json from the featurenet stage's report (empty: no featurenet)."""
    return _figures([("accuracy", report.get("test_accuracy")),
                     ("seconds", report.get("train_seconds"))])  # fmt: skip


def train_metrics(result: dict) -> dict:
    """models/train/metrics.json from result.json's contents: a single run's throughput at its
    last report, or the steps a sweep's trials trained together (early stopping lowers it)."""
    if "trials" in result:
        return _figures([("steps", result.get("trial_steps"))])
    return _figures([("images/s", result.get("final_metrics", {}).get("images_per_s"))])


def _scores(scores: dict) -> dict:
    """Short names for evaluate's `<figure>_<extractor>` scores; Inception's nested under
    `inception`."""
    out: dict = {}
    for key, value in scores.items():
        figure_name, _, extractor = key.rpartition("_")
        if figure_name in SHORT_NAMES and extractor in EXTRACTOR_LEVELS:
            level = EXTRACTOR_LEVELS[extractor]
            into = out if level is None else out.setdefault(level, {})
            into |= _figures([(SHORT_NAMES[figure_name], value)])
    return {k: v for k, v in out.items() if v != {}}


def evaluation_metrics(report: dict) -> dict[str, dict]:
    """The evaluate stage's metrics files, name (without .json) -> contents, from its report:
    c1, c2, ... per candidate (in the report's order), and `real`."""
    files = {}
    timings = report.get("timings", {})
    for rank, (name, result) in enumerate(report["candidates"].items(), start=1):
        figures = _scores(result)
        figures |= _figures([("cas", result.get("cas_accuracy")),
                             ("seconds", timings.get(f"candidate_s.{name}"))])  # fmt: skip
        files[f"c{rank}"] = figures
    # the sanity figures of the real data: fid_floor_<x> (test vs train split), is_real_<x>
    sanity = {re.sub(r"^(fid)_floor_|^(is)_real_", r"\1\2_", k): v
              for k, v in report.get("sanity", {}).items()}  # fmt: skip
    files[REAL] = _scores(sanity) | _figures([("seconds", timings.get("floor_s"))])
    return files


def _own_metrics_files(directory: Path) -> list[str]:
    """The entries of a metrics directory that are ours by name (it holds no marker file: it
    is committed to git, and a marker git ignores would make DVC see a changed output)."""
    return [e.name for e in Path(directory).iterdir() if CANDIDATE_FILE.fullmatch(e.name)]


def check_metrics_dir(directory: str | Path, stage: str, setting: str) -> None:
    """Refuse (pipeline.files.OutputError), before any work, a metrics directory that holds
    entries other than ours (it is replaced as a whole)."""
    check_output_dir(directory, stage, setting, recognise=_own_metrics_files)


def write_metrics_dir(directory: str | Path, files: dict[str, dict], stage: str, setting: str):
    """`files` (name -> contents) as `<directory>/<name>.json`, replacing the directory as a
    whole once all are written."""
    directory = Path(directory)
    check_metrics_dir(directory, stage, setting)
    staging = staging_dir(directory)
    try:
        for name, contents in files.items():
            write_json(staging / f"{name}.json", contents)
        replace_dir(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was put in place
