"""What the stages hand each other: the names of their outputs and the candidate record.

One place for the file and folder names a stage writes and a later one reads (the train
stage's result.json and candidates/, evaluate's generators/), so that a stage depending on
another's output imports a name, not the other stage's code. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

# <train.out_dir>
RESULT = "result.json"  # what a run or a sweep trained: its candidates, figures, provenance
BEST_PARAMS = "best_params.yaml"  # the params of the run (a sweep's best trial)
CANDIDATES = "candidates"  # candidates/<run name>: each candidate's final checkpoint
HISTORY = "history.csv"  # the reported metrics of the (best) run, one row per report
TRAIN_SAMPLES = "samples.png"  # the (best) run's last in-loop sample grid
TRAIN_OUTPUTS = (RESULT, BEST_PARAMS, CANDIDATES, HISTORY, TRAIN_SAMPLES)
TRAIN_STAGE, TRAIN_OUT_DIR_KEY = "train", "train.out_dir"

# <evaluate.out_dir>
GENERATORS = "generators"  # generators/<candidate>: the exported generator evaluate scored
EVALUATE_SAMPLES = "samples"  # samples/<candidate>.png
EVALUATE_OUTPUTS = (EVALUATE_SAMPLES, GENERATORS)
EVALUATE_STAGE, EVALUATE_OUT_DIR_KEY = "evaluate", "evaluate.out_dir"


@dataclass(frozen=True)
class Candidate:
    """One trained generator the evaluate stage scores."""

    name: str  # the training run's name (gan-<family>-<hash>)
    checkpoint: Path
    mlflow_run_id: str | None
    diverged: bool
    steps: int


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
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run the train stage first (dvc repro train)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run the train stage") from None
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
