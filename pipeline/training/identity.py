"""What a training run is and what it is called.

A run is named after what it trains (model, training minus how long and how often, workers,
data version: `run_identity`), so the same params resume the same run from its checkpoint,
and different params never do.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.config import Params, flatten

# Keys that may change between a run and its resumption: they say how long and how often,
# not what is trained. Everything else in model/train (and the dataset) names the run.
RESUMABLE_KEYS = {"steps", "log_every", "checkpoint_every", "debug_checks", "out_dir"}


class ResumeMismatchError(ValueError):
    """A run's checkpoint was trained with a different configuration."""


def run_identity(params: Params, dataset_hash: str) -> dict:
    """What a run is: model, training (minus how long/often), workers and data version."""
    train = {
        k: v for k, v in params.train.model_dump(mode="json").items() if k not in RESUMABLE_KEYS
    }
    return {
        "model": params.model.model_dump(mode="json"),
        "train": train,
        "num_workers": params.ray.num_workers,
        "dataset": dataset_hash,
    }


def run_name(params: Params, dataset_hash: str) -> str:
    digest = hashlib.sha256(json.dumps(run_identity(params, dataset_hash), sort_keys=True).encode())
    return f"gan-{params.model.family}-{digest.hexdigest()[:12]}"


def check_same_run(saved: dict, current: dict) -> None:
    """Resuming with another configuration is a hard error that shows the difference."""
    before, now = flatten(saved), flatten(current)
    diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if diff:
        lines = "\n".join(
            f"  {k}: checkpoint {before.get(k)!r} != now {now.get(k)!r}" for k in diff
        )
        raise ResumeMismatchError(
            f"the run's checkpoint was trained with a different configuration:\n{lines}"
        )
