"""Fault drills: kill a worker once, or poison the weights, to test recovery (tests, chaos runs).

Drills stay off the production signature: a driver reads the plan from the environment
(`drill()` sets it, or GANPIPE_FAULT_PLAN='{"nan_at_step": 6}' for a run from the shell) and
hands it to the workers inside their WorkerConfig.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

FAULT_PLAN_ENV = "GANPIPE_FAULT_PLAN"


@dataclass(frozen=True)
class FaultPlan:
    """exit_rank/exit_at_step/marker: that rank exits abruptly at that step, once (the marker
    file remembers), as a lost node would. nan_at_step: the generator's weights turn NaN."""

    exit_rank: int | None = None
    exit_at_step: int | None = None
    marker: str | None = None
    nan_at_step: int | None = None

    def __post_init__(self):
        exit_keys = (self.exit_rank, self.exit_at_step, self.marker)
        if any(k is not None for k in exit_keys) and any(k is None for k in exit_keys):
            raise ValueError("a worker exit drill needs exit_rank, exit_at_step and marker")

    def inject(self, rank: int, step: int, generator: torch.nn.Module) -> None:
        if step == self.exit_at_step and rank == self.exit_rank:
            marker = Path(self.marker)
            if not marker.exists():
                marker.touch()
                time.sleep(_controller_polls(2))  # the last report is on record, as in life
                os._exit(1)
        if step == self.nan_at_step:
            with torch.no_grad():
                for p in generator.parameters():
                    p.fill_(float("nan"))


def _controller_polls(polls: int) -> float:
    """Seconds for `polls` polls of Ray Train's controller (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    2 s by default). It registers a report's checkpoint when it next polls the workers: a
    worker that exits milliseconds after reporting takes that report with it and the run
    restarts from the checkpoint before, while a node lost in a real run is lost long after."""
    from ray.train.v2._internal.constants import (
        DEFAULT_HEALTH_CHECK_INTERVAL_S,
        HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    )

    interval = os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S)
    return polls * float(interval) + 0.5


def planned_faults() -> FaultPlan | None:
    """The drill a driver started in this process asks for (None: a normal run)."""
    text = os.environ.get(FAULT_PLAN_ENV)
    if not text:
        return None
    try:
        plan = json.loads(text)
        return FaultPlan(**{k: plan[k] for k in plan if k in {f.name for f in fields(FaultPlan)}})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{FAULT_PLAN_ENV} is not a fault plan ({exc}): {text[:200]}") from None


@contextlib.contextmanager
def drill(plan: FaultPlan):
    """Run the drivers called inside with `plan` injected into their workers."""
    before = os.environ.get(FAULT_PLAN_ENV)
    os.environ[FAULT_PLAN_ENV] = json.dumps(asdict(plan))
    try:
        yield plan
    finally:
        if before is None:
            os.environ.pop(FAULT_PLAN_ENV, None)
        else:
            os.environ[FAULT_PLAN_ENV] = before
