"""The training step under real DistributedDataParallel (2 CPU processes, gloo): ranks must stay
identical (gradient penalty, R1, DiffAugment, conditional models, BatchNorm in D), and a
divergence seen by one rank only must stop both ranks at the same step instead of hanging."""

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gan.ema import GeneratorEMA
from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, NonFiniteError, StepConfig, train_step

WORLD = 2
CLASSES = 3

# name -> (step config, number of classes, DCGAN discriminator norm)
CONFIGS = {
    "hinge": (StepConfig(loss="hinge"), 0, "none"),
    "wgan-gp": (StepConfig(loss="wasserstein", n_critic=2, gp_weight=10.0), 0, "layer"),
    "bce-r1-diffaugment": (
        StepConfig(loss="bce", r1_gamma=1.0, r1_every=2, diffaugment=("translation", "color")),
        0,
        "none",
    ),
    "conditional-batchnorm-d": (StepConfig(loss="hinge"), CLASSES, "batch"),
}


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),  # a rank left waiting fails the test instead of hanging
    )
    for name, (cfg, classes, norm) in CONFIGS.items():
        out[name] = _train_and_compare(rank, cfg, classes, norm)
    out[f"diverged-{rank}"] = _diverge_on_rank_0(rank)
    dist.destroy_process_group()


def _batches(rank: int, classes: int):
    rng = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    while True:
        x = torch.rand(4, 1, 8, 8, generator=rng) * 2 - 1
        yield x, (torch.randint(0, classes, (4,), generator=rng) if classes else None)


def _train_and_compare(rank: int, cfg: StepConfig, classes: int, norm: str) -> tuple:
    """Max weight difference (G, D, EMA) between the ranks after 3 steps, and weight size."""
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    g = DDP(
        build_generator("dcgan", channels=1, resolution=8, z_dim=8, width=8, num_classes=classes)
    )
    d = DDP(
        build_discriminator(
            "dcgan", channels=1, resolution=8, width=8, num_classes=classes, norm=norm
        )
    )
    state = GANTrainState(
        g,
        d,
        torch.optim.Adam(g.parameters(), 1e-3),
        torch.optim.Adam(d.parameters(), 1e-3),
        GeneratorEMA(g, half_life_images=1, images_per_step=1, rampup=None),
    )
    data, sampler = _batches(rank, classes), LatentSampler(8, classes)
    for step in range(3):
        train_step(state, data, cfg, sampler, step_generator(0, rank, step), step)
    modules = (g, d, state.ema.model)
    flat = torch.cat([p.detach().flatten() for m in modules for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return (gathered[0] - gathered[1]).abs().max().item(), flat.abs().sum().item()


class ScaledMean(torch.nn.Module):
    """D(x) = w * mean(x) with a huge w: a batch of -1e9 overflows the logit to -inf on one
    rank while every gradient (about 1e9) stays finite."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1e30))

    def forward(self, x, labels=None):
        return self.w * x.flatten(1).mean(dim=1)


def _diverge_on_rank_0(rank: int) -> tuple:
    g = DDP(build_generator("mlp", channels=1, resolution=8, z_dim=8, width=8))
    d = DDP(ScaledMean())
    state = GANTrainState(
        g, d, torch.optim.SGD(g.parameters(), 0.1), torch.optim.SGD(d.parameters(), 0.1)
    )
    real = torch.full((4, 1, 8, 8), -1e9 if rank == 0 else 0.5)
    try:
        train_step(
            state, iter([(real, None)]), StepConfig(loss="hinge"), LatentSampler(8),
            step_generator(0, rank, 0), 0,
        )  # fmt: skip
    except NonFiniteError as exc:
        return exc.step, exc.phase, exc.values["loss_d"]
    return None


def test_ranks_stay_identical_and_stop_together(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
        results = dict(out)
    for name in CONFIGS:
        max_diff, magnitude = results[name]
        assert max_diff == 0.0, name
        assert magnitude > 0, name
    # rank 0's loss is infinite, rank 1's finite: both stop at step 0 in the D phase
    assert results["diverged-0"] == (0, "d", float("inf"))
    step, phase, loss_d = results["diverged-1"]
    assert (step, phase) == (0, "d") and loss_d < float("inf")
