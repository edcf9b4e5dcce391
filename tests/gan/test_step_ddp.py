"""The training step under real DistributedDataParallel (2 CPU processes, gloo): ranks must stay
identical, including with the gradient penalty, R1 and DiffAugment in the discriminator phase."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gan.models import build_discriminator, build_generator
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, StepConfig, train_step

WORLD = 2


CONFIGS = {
    "hinge": StepConfig(loss="hinge"),
    "wgan-gp": StepConfig(loss="wasserstein", n_critic=2, gp_weight=10.0),
    "bce-r1-diffaugment": StepConfig(
        loss="bce", r1_gamma=1.0, r1_every=2, diffaugment=("translation", "color")
    ),
}


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    for name, cfg in CONFIGS.items():
        out[name] = _train_and_compare(rank, cfg)
    dist.destroy_process_group()


def _train_and_compare(rank: int, cfg: StepConfig) -> tuple[float, float]:
    """Max weight difference between the ranks after 3 steps, and how far weights are from 0."""
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    g = DDP(build_generator("dcgan", channels=1, resolution=8, z_dim=8, width=8))
    d = DDP(build_discriminator("dcgan", channels=1, resolution=8, width=8, norm="layer"))
    state = GANTrainState(
        g, d, torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    )
    data_rng = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    data = iter(lambda: (torch.rand(4, 1, 8, 8, generator=data_rng) * 2 - 1, None), None)
    for step in range(3):
        train_step(state, data, cfg, LatentSampler(8), step_generator(0, rank, step), step)
    flat = torch.cat([p.detach().flatten() for m in (g, d) for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return (gathered[0] - gathered[1]).abs().max().item(), flat.abs().sum().item()


def test_ranks_hold_identical_weights_after_ddp_steps(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
        results = dict(out)
    assert set(results) == set(CONFIGS)
    for name, (max_diff, magnitude) in results.items():
        assert max_diff == 0.0, name
        assert magnitude > 0, name
