"""What a driver hands each training worker: one frozen, typed object, built in one place
(`WorkerConfig.build`) and checked once at the worker's entry (`check`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Params
from pipeline.console import library_log_level
from pipeline.training.faults import FaultPlan, planned_faults
from pipeline.training.identity import run_identity
from pipeline.training.tracker import RunRef


@dataclass(frozen=True)
class TrialScoring:
    """What a sweep trial needs to score itself (pipeline.scoring.TrialEvaluator), with
    absolute paths (trials run elsewhere). Here, not beside the scorer: the training workers
    import this module, and the scorer's torch-fidelity import costs each of them a second."""

    eval_samples: int
    prepared: str
    featurenet: str
    cache_dir: str
    seed: int
    dataset_hash: str

    @classmethod
    def of(cls, params: Params, dataset_hash: str, eval_samples: int | None = None):
        """From params; `eval_samples` defaults to sweep.eval_samples."""
        return cls(
            eval_samples=eval_samples or params.sweep.eval_samples,
            prepared=str(Path(params.prepare.out_dir).resolve()),
            featurenet=str(Path(params.featurenet.out_dir).resolve()),
            cache_dir=str(Path(params.evaluate.cache_dir).resolve()),
            seed=params.evaluate.seed,
            dataset_hash=dataset_hash,
        )


@dataclass(frozen=True)
class WorkerConfig:
    params: Params  # local paths absolute: Ray workers run in other directories
    identity: dict  # run_identity(): what a checkpoint this run resumes must have been
    run: RunRef | None = None  # the MLflow run rank 0 records in; None: untracked
    scoring: TrialScoring | None = None  # a sweep trial: scored at every report
    pbt: bool = False  # restored checkpoints may come from other trials (PBT's exploit)
    faults: FaultPlan | None = None  # a drill (pipeline.training.faults); None in production
    # of Ray's and MLflow's logging in the worker: the driver's (pipeline.console)
    log_level: str = field(default_factory=library_log_level)

    @classmethod
    def build(
        cls,
        params: Params,
        dataset_hash: str,
        run: RunRef | None = None,
        scoring: TrialScoring | None = None,
        pbt: bool = False,
    ) -> WorkerConfig:
        tree = params.model_dump(mode="json")
        tree["prepare"]["out_dir"] = str(Path(params.prepare.out_dir).resolve())
        absolute = Params.model_validate(tree)
        identity = run_identity(absolute, dataset_hash)
        config = cls(absolute, identity, run, scoring, pbt, planned_faults())
        config.check_types()
        return config

    def check_types(self) -> None:
        """The fields are what they say (a hand-built config fails here, not mid-run)."""
        expected = {
            "params": Params, "identity": dict, "run": (RunRef, type(None)),
            "scoring": (TrialScoring, type(None)), "pbt": bool, "faults": (FaultPlan, type(None)),
            "log_level": str,
        }  # fmt: skip
        for name, kind in expected.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"WorkerConfig.{name} is a {type(getattr(self, name)).__name__}")
        if self.pbt and self.scoring is None:
            raise ValueError("a PBT trial needs its scoring: PBT exploits by the trials' FID")

    def check(self) -> None:
        """At the worker's entry, on the worker's node: the config and what it points at."""
        self.check_types()
        prepared = Path(self.params.prepare.out_dir)
        if not prepared.is_dir():
            raise FileNotFoundError(
                f"this worker's node has no prepared data at {prepared}: every node of the "
                "cluster must see prepare.out_dir at the same path (a shared filesystem), or "
                "run on one node"
            )
