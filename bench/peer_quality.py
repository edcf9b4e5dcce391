"""The registered champion against a hand-written DCGAN on the same images, at equal wall-clock.

Two arms train on the same prepared train split, one after the other, in one run:
- pipeline:     the stages in this process, as `ganpipe` / `dvc repro` runs them (prepare,
                featurenet, train, evaluate), from a params.yaml written into the workdir: the
                shipped params.yaml with the prepare section taken from the arguments, the
                --set overrides, and every output path inside the workdir. The champion is the
                candidate the register stage would pick (register.metric); its figures are the
                evaluate stage's own (models/evaluate/report.json), for the exported generator and,
                where the file has them, for its raw and EMA generators separately.
- classic loop: the DCGAN recipe of Radford et al. 2016 as the plain single-process PyTorch
                loop a user would write (below, sharing no code with gan/): ConvTranspose2d
                generator with BatchNorm + ReLU and a tanh output, strided Conv2d
                discriminator with BatchNorm (not on its first layer) and LeakyReLU 0.2,
                weights N(0, 0.02) and BatchNorm scales N(1, 0.02), the BCE loss with the
                non-saturating generator loss (the sigmoid folded into BCEWithLogitsLoss),
                Adam 2e-4 (0.5, 0.999) for both, z_dim 100, batch 64, ngf = ndf = 64; the
                topology grows from 4x4 to the prepared resolution. It uses every CPU thread
                and trains until its budget is spent (the clock is read after every step): by
                default the wall-clock of this run's `train(...)` call, Ray's start-up
                included, which favours the loop.
The loop's generator (eval mode) is scored with the evaluate stage's Scorer under the same
protocol (`evaluate.*` params, the featurenet, the same real split and feature cache), class
coverage as the evaluate stage computes it. So that a win does not hang on one feature space,
an independent evaluator also scores both arms: a differently shaped CNN (strided
convolutions, no pooling, global-average features; its own seed) trained here for 600 Adam
steps on the train split, and the Fréchet distance between its features of the real train
split and of each arm's samples (its real-vs-real floor: test split against train split).
Images/s counts the real images the discriminator saw per second of the timed window. Ratios
are loop / champion for lower-is-better rows and champion / loop for the others: above 1, the
champion is better. With --seeds N both arms run N times (train.seed and the loop's seed
0..N-1; mean ± std); prepare, featurenet and the independent evaluator run once.

    python bench/peer_quality.py --data digits --resolution 32 --workdir /tmp/pq-digits
    tar -xzf /work/shared/datasets/cifar10-train.tar.gz -C DIR   # see its README.md
    python bench/peer_quality.py --data DIR/train --channels 3 --max-images 10000 \
        --workdir /tmp/pq-cifar --set train.steps=3000 --json /tmp/pq-cifar.json

Without --workdir the scratch directory is a temporary one, removed at the end except for
the sample grids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch_fidelity import KEY_METRIC_FID
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torchvision.utils import save_image

from gan.sampling import generate
from pipeline.artifacts import list_candidates
from pipeline.candidates import generator_from_checkpoint
from pipeline.cluster import ADDRESS_ENV, STORAGE_ENV, is_remote, storage_root
from pipeline.config import Params, load_params, parse_yaml, validate_params
from pipeline.data import PreparedSplit, quantize
from pipeline.evaluate import evaluate, prepared_generator
from pipeline.featurenet import load_featurenet, train_featurenet
from pipeline.fidelity import real_images
from pipeline.prepare import prepare
from pipeline.registry import best_candidate
from pipeline.scoring import Scorer, class_figures, domain_extractor
from pipeline.sources import IMAGE_SUFFIXES
from pipeline.train import train
from pipeline.training.identity import run_name

SHIPPED_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# Params keys ending so are outputs: each goes inside the workdir. image_dir is an input.
OUTPUT_KEY_SUFFIXES = ("_dir", "_file", "storage_path")
INPUT_KEYS = ("image_dir",)
ENVIRONMENT_OVERRIDES = (ADDRESS_ENV, STORAGE_ENV, "MLFLOW_TRACKING_URI")  # local run only
SUBSET_SEED = 0  # which images --max-images keeps
GRID_IMAGES = 64

# The classic recipe (Radford et al. 2016; the PyTorch DCGAN tutorial's values).
Z_DIM = 100
NGF = NDF = 64
BATCH = 64
LR, BETAS = 2e-4, (0.5, 0.999)

# The independent evaluator: nothing in common with the featurenet but the data.
PROBE_WIDTHS = (24, 48, 96)  # a stride-1 conv, then a stride-2 conv per width after the first
PROBE_STEPS = 600  # Adam steps, whatever the data size (4 epochs left digits at chance)
PROBE_BATCH = 128
PROBE_LR = 1e-3
PROBE_SEED = 20_161_107

# Table rows: (label, key, which way is better, format).
ROWS = (
    ("FID domain", "fid_domain", "min", ".2f"),
    ("KID domain", "kid_domain", "min", ".4f"),
    ("IS domain", "is_domain", "max", ".3f"),
    ("precision domain", "precision_domain", "max", ".3f"),
    ("recall domain", "recall_domain", "max", ".3f"),
    ("class coverage", "class_coverage_domain", "max", ".2f"),
    ("independent FID", "fid_independent", "min", ".2f"),
    ("train wall-clock s", "train_seconds", "min", ".1f"),
    ("steps", "steps", "max", ".0f"),
    ("images/s", "images_per_s", "max", ".1f"),
)
ARMS = ("loop", "champion", "raw", "ema")
TIMING_KEYS = ("train_seconds", "steps", "images_per_s")


def balanced_subset(folder: Path, n: int, scratch: Path) -> Path:
    """A class-balanced, seeded choice of `n` images from `folder` (one subfolder per class),
    as symlinks in `scratch`; `folder` itself when it holds no more than `n` images."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SystemExit(f"--data {folder}: no class subfolders (expected <class>/<image>)")
    files = {
        d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for d in classes
    }
    if sum(len(f) for f in files.values()) <= n:
        return folder
    rng = np.random.default_rng(SUBSET_SEED)
    shutil.rmtree(scratch, ignore_errors=True)
    for i, (name, paths) in enumerate(files.items()):
        quota = n // len(files) + (i < n % len(files))
        (scratch / name).mkdir(parents=True)
        for j in sorted(rng.choice(len(paths), min(quota, len(paths)), replace=False)):
            (scratch / name / paths[j].name).symlink_to(paths[j].resolve())
    return scratch


def write_params(workdir: Path, args: argparse.Namespace, image_dir: Path | None) -> Path:
    """The shipped params.yaml with the prepare section from the arguments and every output
    path (the schema's default where params.yaml names none) inside `workdir`."""
    raw = parse_yaml(SHIPPED_PARAMS.read_text())
    prepare_section = raw.get("prepare") or {}
    prepare_section.pop("image_dir", None)
    prepare_section |= {"resolution": args.resolution, "channels": args.channels}
    if image_dir is None:
        prepare_section["source"] = "digits"
    else:
        # the subset is symlinks to --data's files, which prepare reads only when told to
        prepare_section |= {
            "source": "imagefolder",
            "image_dir": str(image_dir),
            "follow_symlinks": True,
        }
    raw["prepare"] = prepare_section
    for section, values in validate_params(raw).model_dump(mode="json").items():
        for key, value in values.items():
            if key.endswith(OUTPUT_KEY_SUFFIXES) and key not in INPUT_KEYS and value:
                raw[section] = raw.get(section) or {}
                raw[section][key] = str(workdir / value)
    raw.setdefault("tracking", {})["uri"] = f"sqlite:///{workdir / 'mlflow.db'}"
    path = workdir / "params.yaml"
    path.write_text(
        f"# written by bench/peer_quality.py from {SHIPPED_PARAMS}\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    return path


def classic_generator(channels: int, resolution: int) -> nn.Sequential:
    """z (Z_DIM x 1 x 1) -> 4x4 with NGF * 2^(k-1) channels, then k stride-2 ConvTranspose2d
    doublings to `resolution` (k = log2(resolution / 4)), halving the channels; tanh out."""
    widths = [NGF * 2**i for i in reversed(range(int(math.log2(resolution)) - 2))]
    layers = [nn.ConvTranspose2d(Z_DIM, widths[0], 4, 1, 0, bias=False)]
    layers += [nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
    for cin, cout in zip(widths, widths[1:], strict=False):
        layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)]
        layers += [nn.BatchNorm2d(cout), nn.ReLU(True)]
    layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def classic_discriminator(channels: int, resolution: int) -> nn.Sequential:
    """The mirror image: stride-2 Conv2d halvings to 4x4 (BatchNorm after all but the first),
    LeakyReLU 0.2, then a 4x4 convolution to one logit."""
    widths = [NDF * 2**i for i in range(int(math.log2(resolution)) - 2)]
    layers = [nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for cin, cout in zip(widths, widths[1:], strict=False):
        layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False)]
        layers += [nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False), nn.Flatten()]
    return nn.Sequential(*layers)


def dcgan_init(module: nn.Module) -> None:
    """Convolutions N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def shuffled_batches(images: torch.Tensor, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Full batches of BATCH images, reshuffled every epoch, without end."""
    while True:
        for index in torch.randperm(len(images), generator=generator).split(BATCH):
            if len(index) == BATCH:
                yield images[index]


def train_classic(pixels: np.ndarray, seed: int, seconds: float) -> tuple[nn.Module, dict]:
    """The classic DCGAN loop on uint8 NHWC `pixels` until `seconds` have passed; the
    generator (eval mode) and its steps, seconds and images/s."""
    if len(pixels) < BATCH:
        raise SystemExit(f"the train split has {len(pixels)} images: fewer than a batch")
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(seed)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    _, channels, resolution, _ = images.shape
    g = classic_generator(channels, resolution)
    d = classic_discriminator(channels, resolution)
    g.apply(dcgan_init)
    d.apply(dcgan_init)
    opt_g = torch.optim.Adam(g.parameters(), LR, betas=BETAS)
    opt_d = torch.optim.Adam(d.parameters(), LR, betas=BETAS)
    bce = nn.BCEWithLogitsLoss()
    real_label, fake_label = torch.ones(BATCH, 1), torch.zeros(BATCH, 1)
    batches = shuffled_batches(images, torch.Generator().manual_seed(seed))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        real = next(batches)
        fake = g(torch.randn(BATCH, Z_DIM, 1, 1))
        loss_d = bce(d(real), real_label) + bce(d(fake.detach()), fake_label)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(d(fake), real_label)  # non-saturating: log D(G(z)) is maximised
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        steps += 1
    elapsed = time.perf_counter() - start
    figures = {"train_seconds": elapsed, "steps": steps, "images_per_s": steps * BATCH / elapsed}
    return g.eval(), figures


@torch.no_grad()
def classic_samples(g: nn.Module, n: int, seed: int, batch_size: int) -> torch.Tensor:
    """`n` images in [-1, 1] (float NCHW, CPU) from seed-fixed noise."""
    z = torch.randn(n, Z_DIM, 1, 1, generator=torch.Generator().manual_seed(seed))
    return torch.cat([g(chunk) for chunk in z.split(batch_size)])


class ProbeNet(nn.Module):
    """The independent evaluator's CNN: BatchNorm + ELU convolutions, downsampling by stride
    (no pooling), global-average features, a linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        layers, cin = [], channels
        for i, width in enumerate(PROBE_WIDTHS):
            layers += [nn.Conv2d(cin, width, 3, 1 if i == 0 else 2, 1), nn.BatchNorm2d(width)]
            layers += [nn.ELU()]
            cin = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class IndependentFID:
    """FID in the features of a ProbeNet trained here on the train split: each arm's samples
    against the real train split, and the floor (the real test split against it)."""

    def __init__(self, prepared: str):
        start = time.perf_counter()
        pixels, labels = PreparedSplit(prepared, "train").read()
        test_pixels, test_labels = PreparedSplit(prepared, "test").read()
        self.net = self._fit(self._as_float(pixels), torch.from_numpy(labels))
        self.seconds = time.perf_counter() - start
        test = self._as_float(test_pixels)
        with torch.no_grad():
            predicted = torch.cat([self.net(x).argmax(1) for x in test.split(512)])
        self.test_accuracy = float((predicted.numpy() == test_labels).mean())
        self.real = fid_features_to_statistics(self._features(self._as_float(pixels)))
        self.floor = self._fid(test)

    @staticmethod
    def _as_float(pixels: np.ndarray) -> torch.Tensor:
        return (
            torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        )

    @staticmethod
    def _fit(images: torch.Tensor, labels: torch.Tensor) -> ProbeNet:
        """PROBE_STEPS of Adam on cross-entropy over reshuffled epochs, no augmentation."""
        torch.manual_seed(PROBE_SEED)
        net = ProbeNet(images.shape[1], int(labels.max()) + 1)
        optimizer = torch.optim.Adam(net.parameters(), PROBE_LR)
        order = torch.Generator().manual_seed(PROBE_SEED)
        net.train()
        steps = 0
        while steps < PROBE_STEPS:
            for index in torch.randperm(len(images), generator=order).split(PROBE_BATCH):
                loss = F.cross_entropy(net(images[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
                if steps == PROBE_STEPS:
                    break
        return net.eval().requires_grad_(False)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.net.body(x) for x in images.split(512)]).double()

    def _fid(self, images: torch.Tensor) -> float:
        stats = fid_features_to_statistics(self._features(images))
        return fid_statistics_to_metric(stats, self.real, verbose=False)[KEY_METRIC_FID]

    def __call__(self, generated: torch.Tensor) -> float:
        """FID of generated float images in [-1, 1], quantised as the evaluate stage does."""
        return self._fid(quantize(generated).float() / 127.5 - 1)


class LoopScorer:
    """The evaluate stage's figures for samples that come from outside the pipeline: its
    Scorer with the featurenet under the `evaluate.*` protocol, and its class coverage."""

    def __init__(self, params: Params):
        c = params.evaluate
        split = PreparedSplit(params.prepare.out_dir, c.split)
        pixels, self.labels = split.read()
        self.net, info = load_featurenet(params.featurenet.out_dir)
        extractor = domain_extractor(params.featurenet.out_dir, info)
        self.scorer = Scorer(c, {"domain": extractor}, split.dataset_hash)
        self.real, self.split = real_images(pixels), c.split

    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        scores = self.scorer.score(generated, self.real, self.split)
        # the evaluate stage's class coverage: a private helper, imported rather than copied
        return scores | class_figures(self.net, generated, 0, self.labels)


def run_pipeline(params: Params, independent: IndependentFID, grid: Path) -> dict:
    """Train and evaluate as the stages do (a fresh run: no checkpoint to resume); the
    champion's, raw and EMA generators' figures, the sanity figures and the report."""
    import ray

    manifest = PreparedSplit(params.prepare.out_dir, "train").manifest
    storage = storage_root(params)
    if not is_remote(storage):
        shutil.rmtree(
            Path(storage) / run_name(params, manifest["dataset_hash"]), ignore_errors=True
        )
    start = time.perf_counter()
    summary = train(params)
    seconds = time.perf_counter() - start
    ray.shutdown()  # the next seed pays for Ray's start-up too, as a new `ganpipe train` does
    report = evaluate(params)
    c = params.evaluate
    name, scored = best_candidate(report["candidates"], params.register.metric)
    exported = scored.get("generator", c.generator)
    figures = {k: v for k, v in scored.items() if isinstance(v, float)}
    by_generator = scored.get("by_generator") or {exported: figures}
    images = summary["steps"] * params.global_batch_size * params.train.n_critic
    timing = {"train_seconds": seconds, "steps": summary["steps"], "images_per_s": images / seconds}
    arms = {"champion": figures | timing}
    checkpoint = next(x.checkpoint for x in list_candidates(params.train.out_dir) if x.name == name)
    for which in ("raw", "ema"):
        g, spec, _ = generator_from_checkpoint(checkpoint, manifest, which)
        g = prepared_generator(g, spec, c.seed)  # as the evaluate stage samples it
        fake = generate(
            g, c.num_samples, spec.z_dim, spec.num_classes, c.seed, batch_size=c.batch_size
        )
        arms[which] = dict(by_generator.get(which, {})) | {"fid_independent": independent(fake)}
        if which == exported:
            arms["champion"]["fid_independent"] = arms[which]["fid_independent"]
            save_image(
                generate(g, GRID_IMAGES, spec.z_dim, spec.num_classes, c.seed).add(1).div(2),
                grid,
                nrow=8,
            )
    return {
        "candidate": name,
        "exported": exported,
        "sanity": report["sanity"],
        "featurenet": report["featurenet"],
        "arms": arms,
    }


def run_loop(
    params: Params,
    seed: int,
    seconds: float,
    scorer: LoopScorer,
    independent: IndependentFID,
    grid: Path,
) -> dict:
    """The classic loop for `seconds` on the prepared train split, scored like the pipeline."""
    pixels, _ = PreparedSplit(params.prepare.out_dir, "train").read()
    g, figures = train_classic(pixels, seed, seconds)
    c = params.evaluate
    fake = classic_samples(g, c.num_samples, c.seed, c.batch_size)
    save_image(classic_samples(g, GRID_IMAGES, c.seed, GRID_IMAGES).add(1).div(2), grid, nrow=8)
    return figures | scorer(fake) | {"fid_independent": independent(fake)}


def ratio(loop: float | None, champion: float | None, better: str) -> float | None:
    """Above 1: the champion is better."""
    if loop is None or champion is None:
        return None
    top, bottom = (loop, champion) if better == "min" else (champion, loop)
    return top / bottom if bottom else None


def summarise(runs: list[dict]) -> dict:
    """Per row and column (ratio included): mean, std (over seeds; 0 for one) and the values."""
    table = {}
    for _, key, better, _ in ROWS:
        columns = {arm: [run["arms"][arm].get(key) for run in runs] for arm in ARMS}
        columns["ratio"] = [
            ratio(loop, champion, better)
            for loop, champion in zip(columns["loop"], columns["champion"], strict=True)
        ]
        table[key] = {}
        for column, values in columns.items():
            present = [float(v) for v in values if v is not None]
            table[key][column] = {
                "mean": float(np.mean(present)) if present else None,
                "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
                "values": values,
            }
    return table


def print_table(table: dict, runs: list[dict]) -> None:
    """Rows = metrics, columns = the arms and the ratio; mean ± std with several seeds."""
    several = len(runs) > 1
    exported = "/".join(sorted({run["exported"] for run in runs}))
    header = ("", "classic loop", f"champion ({exported})", "pipeline raw", "pipeline ema", "ratio")
    width = 22 if several else 16
    print(f"{header[0]:20}" + "".join(f"{h:>{width}}" for h in header[1:]))
    for label, key, _, spec in ROWS:
        cells = []
        for column in (*ARMS, "ratio"):
            cell = table[key][column]
            if cell["mean"] is None:  # the run's timing belongs to the champion column
                cells.append("" if column in ("raw", "ema") and key in TIMING_KEYS else "n/a")
                continue
            shown_spec = ".3f" if column == "ratio" else spec
            text = f"{cell['mean']:{shown_spec}}"
            cells.append(f"{text} ± {cell['std']:{shown_spec}}" if several else text)
        print(f"{label:20}" + "".join(f"{c:>{width}}" for c in cells))
    print(
        "ratio: loop / champion for FID, KID and seconds, champion / loop otherwise; "
        "above 1, the champion is better"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="'digits', or an image folder with one subfolder per class"
    )
    parser.add_argument("--resolution", type=int, default=32, help="prepared side, a power of 2")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument(
        "--max-images",
        type=int,
        default=10_000,
        help="image folder only: a class-balanced seeded subset of this size",
    )
    parser.add_argument(
        "--workdir", type=Path, help="scratch directory, kept (default: a temp one)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param (repeatable)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="repeat both arms with train.seed / loop seed 0..N-1"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="the loop's budget (default: this run's train-stage wall-clock)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    return parser.parse_args()


def run_benchmark(args: argparse.Namespace, params_file: Path, grids: Path) -> dict:
    """Prepare, featurenet and the independent evaluator once, then both arms per seed; every
    figure, JSON-ready. Runs with the workdir as the current directory."""
    base = load_params(params_file, args.overrides)
    manifest = prepare(base, progress=False)
    counts = {s: v["rows"] for s, v in manifest["splits"].items()}
    print(f"prepared {manifest['source']} {base.prepare.resolution} px, {counts} images")
    featurenet = train_featurenet(base)
    if not featurenet["available"]:
        raise SystemExit(f"--data {args.data}: {featurenet['reason']}")
    independent = IndependentFID(base.prepare.out_dir)
    print(
        f"featurenet test accuracy {featurenet['test_accuracy']:.4f}; independent evaluator "
        f"{independent.test_accuracy:.4f} ({independent.seconds:.0f} s)"
    )
    scorer = LoopScorer(base)
    runs = []
    for seed in range(args.seeds):
        params = load_params(params_file, [*args.overrides, f"train.seed={seed}"])
        run = run_pipeline(params, independent, grids / f"seed{seed}-pipeline.png")
        budget = args.seconds or run["arms"]["champion"]["train_seconds"]
        run["arms"]["loop"] = run_loop(
            params, seed, budget, scorer, independent, grids / f"seed{seed}-classic-loop.png"
        )
        runs.append({"seed": seed, "budget_seconds": budget, **run})
        print(
            f"seed {seed}: pipeline {run['arms']['champion']['steps']} steps, classic loop "
            f"{run['arms']['loop']['steps']} steps in {budget:.1f} s"
        )
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "prepared": counts,
        "num_samples": base.evaluate.num_samples,
        "featurenet_test_accuracy": featurenet["test_accuracy"],
        "independent": {
            "test_accuracy": independent.test_accuracy,
            "train_seconds": independent.seconds,
            "fid_floor": independent.floor,
        },
        "runs": runs,
        "summary": summarise(runs),
    }


def print_context(results: dict) -> None:
    """What frames the table: data, sample counts, the sanity figures of both feature spaces."""
    sanity, champion = results["runs"][0]["sanity"], results["runs"][0]["arms"]["champion"]
    nan = float("nan")
    print(
        f"\n{results['args']['data']}: {results['prepared']['train']} train images, "
        f"{results['num_samples']} samples per arm, {len(results['runs'])} seed(s). Domain "
        f"(featurenet, test accuracy {results['featurenet_test_accuracy']:.3f}): FID floor "
        f"{sanity.get('fid_floor_domain', nan):.2f}, ceiling "
        f"{champion.get('fid_ceiling_domain', nan):.2f}, IS of real images "
        f"{sanity.get('is_real_domain', nan):.3f}. Independent evaluator (test accuracy "
        f"{results['independent']['test_accuracy']:.3f}): FID floor "
        f"{results['independent']['fid_floor']:.2f}"
    )


def remove_scratch(workdir: Path, keep: Path) -> None:
    """Everything in `workdir` but `keep`."""
    for entry in workdir.iterdir():
        if entry == keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def main() -> None:
    args = parse_args()
    for name in ENVIRONMENT_OVERRIDES:  # a local Ray, checkpoints and tracking in the workdir
        os.environ.pop(name, None)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="peer-quality-"))).resolve()
    grids = workdir / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    image_dir = None
    if args.data != "digits":
        image_dir = balanced_subset(Path(args.data).resolve(), args.max_images, workdir / "images")
    params_file = write_params(workdir, args, image_dir)
    print(f"workdir {workdir}, params {params_file}")
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        results = run_benchmark(args, params_file, grids)
    finally:
        os.chdir(cwd)
    print_context(results)
    print_table(results["summary"], results["runs"])
    for path in sorted(grids.glob("*.png")):
        print(f"grid: {path}")
    if args.json:
        args.json.write_text(json.dumps({"workdir": str(workdir), **results}, indent=2) + "\n")
        print(f"figures: {args.json}")
    if args.workdir is None:
        remove_scratch(workdir, keep=grids)


if __name__ == "__main__":
    main()
