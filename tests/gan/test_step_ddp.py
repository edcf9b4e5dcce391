"""The training step under real DistributedDataParallel (2 CPU processes, gloo): ranks must stay
identical (gradient penalty, R1, DiffAugment, conditional models, BatchNorm in D, the reused
fake batch of n_critic 1), and a divergence seen by one rank only must make every rank skip the
update and report it at the same step (since issue 14 the step skips and records instead of
raising: `state.divergence.raise_if_diverged()` raises at the report), with equal weights."""

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gan.ema import GeneratorEMA
from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, NonFiniteError, StepConfig, adam, train_step

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
    out[f"nan-{rank}"] = _nan_batch_on_rank_1(rank)
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
        adam(g.parameters(), 1e-3, (0.9, 0.999)),  # fused: skips on the device
        adam(d.parameters(), 1e-3, (0.9, 0.999)),
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


def _report(state: GANTrainState) -> tuple | None:
    try:
        state.divergence.raise_if_diverged()
    except NonFiniteError as exc:
        return exc.step, exc.phase, exc.values
    return None


def _rank_difference(modules) -> float:
    """The largest parameter difference between the two ranks (an all-gather)."""
    flat = torch.cat([p.detach().flatten() for m in modules for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return (gathered[0] - gathered[1]).abs().max().item()


def _diverge_on_rank_0(rank: int) -> tuple:
    """SGD (the host fallback): rank 0's loss is infinite, its gradients and rank 1's finite."""
    g = DDP(build_generator("mlp", channels=1, resolution=8, z_dim=8, width=8))
    d = DDP(ScaledMean())
    state = GANTrainState(
        g, d, torch.optim.SGD(g.parameters(), 0.1), torch.optim.SGD(d.parameters(), 0.1)
    )
    real = torch.full((4, 1, 8, 8), -1e9 if rank == 0 else 0.5)
    train_step(
        state, iter([(real, None)]), StepConfig(loss="hinge"), LatentSampler(8),
        step_generator(0, rank, 0), 0,
    )  # fmt: skip
    step, phase, values = _report(state)
    return step, phase, values["loss_d"], d.module.w.item(), _rank_difference([g, d])


def _nan_batch_on_rank_1(rank: int) -> tuple:
    """Fused Adam, DCGAN with BatchNorm in D: rank 1's batch of step 2 is NaN. Reports after
    steps 1, 3 and 5; weights after step 5 against those after step 1."""
    torch.manual_seed(rank)
    g = DDP(build_generator("dcgan", channels=1, resolution=8, z_dim=8, width=8))
    d = DDP(build_discriminator("dcgan", channels=1, resolution=8, width=8, norm="batch"))
    state = GANTrainState(
        g, d, adam(g.parameters(), 1e-3, (0.5, 0.999)), adam(d.parameters(), 1e-3, (0.5, 0.999)),
        GeneratorEMA(g, half_life_images=1, images_per_step=1, rampup=None),
    )  # fmt: skip
    data, sampler, cfg = _batches(rank, 0), LatentSampler(8), StepConfig(loss="bce")
    modules = (g, d, state.ema.model)
    reports, kept = [], None
    for step in range(6):
        real, labels = next(data)
        if step == 2 and rank == 1:
            real = torch.full_like(real, float("nan"))
        train_step(state, iter([(real, labels)]), cfg, sampler, step_generator(0, rank, step), step)
        if step == 1:
            kept = [p.detach().clone() for m in modules for p in m.parameters()]
        if step % 2:
            report = _report(state)
            reports.append(None if report is None else report[:2])
    now = [p.detach() for m in modules for p in m.parameters()]
    unchanged = all(torch.equal(a, b) for a, b in zip(kept, now, strict=True))
    return reports, unchanged, _rank_difference(modules)


def test_ranks_stay_identical_and_stop_together(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
        results = dict(out)
    for name in CONFIGS:
        max_diff, magnitude = results[name]
        assert max_diff == 0.0, name
        assert magnitude > 0, name
    # rank 0's loss is infinite, rank 1's finite: both skip and report step 0's D update
    for rank in range(WORLD):
        step, phase, loss_d, w, difference = results[f"diverged-{rank}"]
        assert (step, phase) == (0, "d") and difference == 0.0
        assert w == torch.tensor(1e30).item()  # not stepped
        assert (loss_d == float("inf")) == (rank == 0)
    # a NaN batch on rank 1 at step 2: no report before it, both ranks name step 2 at the next
    # report and the next, and both keep the weights of step 1, equal across the ranks
    for rank in range(WORLD):
        reports, unchanged, difference = results[f"nan-{rank}"]
        assert reports == [None, (2, "d"), (2, "d")], rank
        assert unchanged and difference == 0.0, rank
