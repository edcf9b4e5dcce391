"""Where the training loop runs: a Ray Train worker (DDP across ranks) or a Tune trial.

DDP choices for a GAN (both networks are wrapped separately, one `prepare_model` each):
- forward_sync_buffers=True (formerly broadcast_buffers): BatchNorm running statistics are
  copied from rank 0 at each forward, so every rank holds the same buffers, and the EMA
  generator (which copies them) agrees too.
- find_unused_parameters=False: every parameter of the trained network gets a gradient in its
  phase. In the generator phase the discriminator is only used: gan.step freezes its
  parameters and calls it under `no_sync`, so its reducer neither waits for nor all-reduces
  gradients (the fake batch is detached in the discriminator phase, see STACK_NOTES).
"""

from __future__ import annotations

from pathlib import Path

import torch


class TrainSession:
    """A Ray Train worker: rank and world from Train's context, DDP-wrapped modules."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, module: torch.nn.Module, growing: bool = False) -> torch.nn.Module:
        """DDP; a growing network (progan) leaves the layers of other resolutions unused."""
        import ray.train.torch

        ddp = {"forward_sync_buffers": True, "find_unused_parameters": growing}
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, directory: Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """One process, one rank: a Tune function trainable reports and restores itself (what
    Population Based Training needs: Ray's PBT cannot exploit Train runs)."""

    rank, world = 0, 1

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, module: torch.nn.Module, growing: bool = False) -> torch.nn.Module:
        return module.to(self.device)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict, directory: Path | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(directory) if directory else None
        tune.report(metrics, checkpoint=checkpoint)
