"""The `train` stage: a single training run, or a Ray Tune sweep when params.yaml has a
`sweep.space`. Both drivers live in pipeline/training/ (single.py, sweep.py) on the same
worker loop and run plumbing."""

from __future__ import annotations

from pipeline.config import Params
from pipeline.training.single import train_single
from pipeline.training.sweep import sweep


def train(params: Params) -> dict:
    """Run (or resume) the stage; result.json, candidates and history in train.out_dir."""
    return sweep(params) if params.sweep.space else train_single(params)
