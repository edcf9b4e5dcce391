"""What the stages hand each other: the names of their outputs, the candidate record, and
reading a stage's JSON output with an error that says which stage to re-run.

One place for the file and folder names a stage writes and a later one reads (the train
stage's result.json and candidates/, evaluate's report.json and generators/), so that a stage
depending on another's output imports a name, not the other stage's code. Nothing here
imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

# <train.out_dir>
RESULT = "result.json"  # what a run or a sweep trained: its candidates, figures, provenance
TRAIN_METRICS = "metrics.json"  # DVC metrics: its figures that compare (pipeline.metrics_files)
BEST_PARAMS = "best_params.yaml"  # the params of the run (a sweep's best trial)
CANDIDATES = "candidates"  # candidates/<run name>: each candidate's final checkpoint
HISTORY = "history.csv"  # the reported metrics of the (best) run, one row per report
TRAIN_SAMPLES = "samples.png"  # the (best) run's last in-loop sample grid
TRAIN_OUTPUTS = (RESULT, TRAIN_METRICS, BEST_PARAMS, CANDIDATES, HISTORY, TRAIN_SAMPLES)
TRAIN_STAGE, TRAIN_OUT_DIR_KEY = "train", "train.out_dir"

# <evaluate.out_dir>
GENERATORS = "generators"  # generators/<candidate>: the exported generator evaluate scored
EVALUATE_SAMPLES = "samples"  # samples/<candidate>.png
EVALUATE_REPORT = "report.json"  # every candidate's scores, the protocol, the sanity figures
EVALUATE_OUTPUTS = (EVALUATE_SAMPLES, GENERATORS, EVALUATE_REPORT)
EVALUATE_STAGE, EVALUATE_OUT_DIR_KEY = "evaluate", "evaluate.out_dir"
EVALUATE_METRICS_DIR_KEY = "evaluate.metrics_dir"

# <augment.out_dir>
AUGMENT_REPORT = "report.json"  # accuracy with and without synthetic images, per candidate
AUGMENT_TABLE = "accuracy.csv"  # the DVC plot: accuracy against real images per class
AUGMENT_PLOT = "accuracy.png"
AUGMENT_OUTPUTS = (AUGMENT_REPORT, AUGMENT_TABLE, AUGMENT_PLOT)
AUGMENT_STAGE, AUGMENT_OUT_DIR_KEY = "augment", "augment.out_dir"
AUGMENT_METRICS_DIR_KEY = "augment.metrics_dir"


@dataclass(frozen=True)
class Candidate:
    """One trained generator the evaluate stage scores."""

    name: str  # the training run's name (gan-<family>-<hash>)
    checkpoint: Path
    mlflow_run_id: str | None
    diverged: bool
    steps: int


def is_score(value) -> bool:
    """A figure a stage reported: a finite int or float (not a bool, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def candidate_record(name: str, run_id: str | None, steps: int, diverged: bool = False) -> dict:
    """result.json's entry for the candidate trained by run `name`."""
    return {
        "name": name,
        "checkpoint": f"{CANDIDATES}/{name}",
        "mlflow_run_id": run_id,
        "diverged": diverged,
        "steps": steps,
    }


def earlier_train_outputs(out_dir: Path) -> list[str]:
    """What a train stage wrote in `out_dir` before pipeline.files' markers: our entries, when
    its result.json says so."""
    try:
        ours = "candidates" in json.loads((Path(out_dir) / RESULT).read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    return list(TRAIN_OUTPUTS) if ours else []


def list_candidates(train_out: str | Path) -> list[Candidate]:
    """The candidates in the train stage's result.json, with absolute checkpoint paths."""
    train_out = Path(train_out)
    path = train_out / RESULT
    result = read_stage_json(path, TRAIN_STAGE, DataError)
    candidates = [
        Candidate(
            name=c["name"],
            checkpoint=(train_out / c["checkpoint"]).resolve(),
            mlflow_run_id=c.get("mlflow_run_id"),
            diverged=bool(c.get("diverged")),
            steps=int(c.get("steps", 0)),
        )  # fmt: skip
        for c in result.get("candidates", [])
    ]
    if not candidates:
        raise DataError(f"{path} lists no candidates with a checkpoint; re-run the train stage")
    return candidates


def read_stage_json(path: str | Path, stage: str, error: type[Exception]) -> dict:
    """The JSON object in `path`, a file the `stage` stage writes. A file that is missing,
    unreadable, not JSON (or not UTF-8) or not a JSON object raises `error`, the caller's own
    exception class (the CLI maps it to an exit code), with a message naming the file, what is
    wrong and the fix: `dvc repro <stage>`."""
    path = Path(path)
    fix = f"re-run the {stage} stage (dvc repro {stage})"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise error(f"{path} is missing: run the {stage} stage first (dvc repro {stage})") from None
    except OSError as exc:  # a directory, no permission
        raise error(f"{path} cannot be read ({exc.strerror}): {fix}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got a {_json_type(data)}: {fix}")
    return data


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (object, list, string, boolean, null, number)."""
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )
