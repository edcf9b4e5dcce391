"""GANs as data augmentation (issue 16): does a generator's images help a classifier that has
only k real images per class, and from which k on does it stop helping?

The pipeline's own stages, in this process, in a scratch directory (`--workdir`): prepare,
featurenet, train (one Ray worker using both CPUs, as params.yaml ships), evaluate (which
exports the generators) and augment (pipeline/augment.py: its docstring is the protocol), from
a params.yaml written there by bench/peer_quality.py's `write_params` (the shipped params.yaml,
the prepare section from the arguments, every output path, ray.storage_path and a sqlite
tracking URI inside the workdir), plus the --set overrides. The augment stage's report is the
figures; this script prints them as one table per run and copies the stage's accuracy.png to
bench/grids/augment-<name>.png.

Two readings:
- default: the generator(s) train on the whole train split (the augment stage's own reading:
  "do a GAN's images of plentiful unlabeled data help when labels are scarce?").
- --train-subset K (repeatable): the true low-data reading. For each K a prepared directory is
  built whose train split is K images per class of the prepared train split (the subset the
  augment stage draws for its first seed: augment.seed mixed with 0) and whose test split is
  the real test split; the featurenet (featurenet.min_skill 0: it knows only those images),
  the GAN and the augment stage (shots: all, i.e. those K) run on it. The augment seeds then
  vary the classifiers' initialisation and data order only, not the real images.

    python bench/augment.py --data digits --resolution 16 --name digits \\
        --set model.conditional=true --set 'augment.shots=[10, 50, all]'
    python bench/augment.py --data digits --resolution 16 --name digits-subset \\
        --set model.conditional=true --train-subset 10 --train-subset 50
    python bench/augment.py --data /work/scratch/cifar10k --channels 3 --resolution 32 \\
        --name cifar10 --set model.conditional=true --set train.steps=1500 \\
        --set 'augment.shots=[10, 50, 200]'

Several generators in one augment run: a sweep grid over a model key gives one candidate per
value (e.g. --set 'sweep.space.model.conditional={type: grid, values: [true, false]}' with
sweep.num_trials=1, sweep.scheduler=fifo, sweep.top_k=2); an unconditional candidate's
synthetic images are labeled by the real classifier of the same k and seed (pseudo-labels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

from bench.peer_quality import ENVIRONMENT_OVERRIDES, write_params
from gan.sampling import mix_seed
from pipeline.artifacts import AUGMENT_PLOT
from pipeline.augment import augment, subset
from pipeline.config import Params, load_params
from pipeline.data import PreparedSplit
from pipeline.evaluate import evaluate
from pipeline.featurenet import train_featurenet
from pipeline.prepare import prepare
from pipeline.shards import read_manifest, write_prepared
from pipeline.train import train

GRIDS = Path(__file__).resolve().parent / "grids"
SUBSET_DESCRIBE_KEYS = ("source", "params", "class_names", "task")  # copied from the manifest


def run_stages(params: Params) -> dict:
    """featurenet, train, evaluate, augment on `params.prepare.out_dir`; the augment report
    plus the stages' timings and the featurenet / evaluate figures that frame it."""
    import ray

    timings, tick = {}, time.perf_counter()
    featurenet = train_featurenet(params)
    if not featurenet["available"]:
        raise SystemExit(f"featurenet: {featurenet['reason']}")
    timings["featurenet"] = time.perf_counter() - tick
    tick = time.perf_counter()
    summary = train(params)
    ray.shutdown()
    timings["train"] = time.perf_counter() - tick
    tick = time.perf_counter()
    evaluated = evaluate(params)
    timings["evaluate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    report = augment(params)
    timings["augment"] = time.perf_counter() - tick
    return {
        "report": report,
        "out_dir": params.augment.out_dir,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "featurenet_test_accuracy": featurenet["test_accuracy"],
        "train_steps": summary.get("steps"),
        "evaluate": {
            name: {
                k: c.get(k)
                for k in ("generator", "fid_domain", "class_coverage_domain", "cas_accuracy")
            }
            for name, c in evaluated["candidates"].items()
        },
    }


def subset_prepared(source_dir: str, out_dir: Path, per_class: int, seed: int) -> dict:
    """A prepared directory whose train split is `per_class` images per class of
    `source_dir`'s train split (pipeline.augment.subset with `seed`) and whose test split is
    `source_dir`'s test split; its manifest."""
    manifest = read_manifest(Path(source_dir))
    train_split = PreparedSplit(source_dir, "train")
    images, labels = train_split.read()
    rows = subset(labels, per_class, seed)
    test_images, test_labels = PreparedSplit(source_dir, "test").read()

    def items():
        for image, label in zip(images[rows], labels[rows], strict=True):
            yield "train", image, int(label)
        for image, label in zip(test_images, test_labels, strict=True):
            yield "test", image, int(label)

    describe = {k: manifest[k] for k in SUBSET_DESCRIBE_KEYS if k in manifest}
    describe["subset_of"] = {
        "dataset_hash": manifest["dataset_hash"],
        "train_per_class": per_class,
        "seed": seed,
    }
    shard_rows = manifest["params"].get("shard_rows", 4096)
    return write_prepared(items(), out_dir, tuple(manifest["shape"]), shard_rows, describe)


def gain_cell(gain: dict) -> str:
    mark = "*" if gain["exceeds_spread"] else ""
    return f"{gain['mean']:+.3f} ± {gain['std']:.3f}{mark}"


def print_report(title: str, run: dict) -> None:
    """Setting x k: accuracy mean ± std over seeds; per generator and ratio the seed-paired
    gains over real and over classical (* where the mean exceeds the std); CAS."""
    report = run["report"]
    shots = list(report["shots"])
    head = [f"{k} ({report['shots'][k]['real_images']} real)" for k in shots]
    print(f"\n{title}: accuracy on the real test split, mean ± std over "
          f"{report['protocol']['seeds']} seeds")  # fmt: skip
    print(f"{'setting':28}" + "".join(f"{h:>24}" for h in head))
    for b, per_shot in report["baselines"].items():
        print(f"{b:28}" + "".join(f"{_cell(per_shot[k]):>24}" for k in shots))
    for rank, c in enumerate(report["candidates"].values(), start=1):
        label = f"c{rank} {'conditional' if c['labels'] == 'conditioning' else 'uncond.'}"
        for ratio, per_shot in c["synthetic"].items():
            print(
                f"{label + ' +' + ratio:28}" + "".join(f"{_cell(per_shot[k]):>24}" for k in shots)
            )
            for key, versus in (("gain", "real"), ("gain_vs_classical", "classical")):
                row = f"  gain over {versus}"
                print(f"{row:28}" + "".join(f"{gain_cell(c[key][ratio][k]):>24}" for k in shots))
        cas = c["cas"]
        print(f"{label + ' CAS':28}{_cell(cas):>24}  ({cas['images']} synthetic images, "
              f"{cas['labels']}); rejected share {c['rejected_share']:.3f}, "
              f"short {c['short_images']}")  # fmt: skip
    names = ", ".join(f"c{i} {n}" for i, n in enumerate(report["candidates"], start=1))
    print(f"* the seed-paired mean gain exceeds its std (exceeds_spread); candidates: {names}")
    print(f"stage seconds: {run['seconds']}; featurenet test accuracy "
          f"{run['featurenet_test_accuracy']:.3f}; evaluate: {run['evaluate']}")  # fmt: skip


def _cell(spread: dict) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="'digits', or an image folder with one subfolder per class"
    )
    parser.add_argument("--resolution", type=int, default=16, help="prepared side, a power of 2")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--name", required=True, help="the run's name: bench/grids/augment-NAME")
    parser.add_argument("--workdir", type=Path, help="scratch dir (default: /tmp/augment-NAME)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param (repeatable)",
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="train featurenet, GAN and augment on K images per class only (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse a workdir: stages rerun on it, train resumes its Ray run (same name)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for name in ENVIRONMENT_OVERRIDES:  # a local Ray, checkpoints and tracking in the workdir
        os.environ.pop(name, None)
    workdir = (args.workdir or Path(f"/tmp/augment-{args.name}")).resolve()
    if workdir.exists() and any(workdir.iterdir()) and not args.resume:
        raise SystemExit(f"--workdir {workdir} is not empty: a fresh run needs a fresh directory")
    workdir.mkdir(parents=True, exist_ok=True)
    image_dir = None if args.data == "digits" else Path(args.data).resolve()
    params_file = write_params(workdir, args, image_dir)
    print(f"workdir {workdir}, params {params_file}")
    GRIDS.mkdir(exist_ok=True)
    cwd, start = Path.cwd(), time.perf_counter()
    os.chdir(workdir)
    runs = {}
    try:
        base = load_params(params_file, args.overrides)
        manifest = prepare(base, progress=False)
        counts = {s: v["rows"] for s, v in manifest["splits"].items()}
        print(f"prepared {manifest['source']} {base.prepare.resolution} px: {counts}")
        if not args.train_subset:
            runs[args.name] = run_stages(base)
        for k in args.train_subset:
            # the augment stage's subset for its first seed, so k's real images are the same
            seed = mix_seed(base.augment.seed, 0)
            sub = workdir / f"k{k}"
            sub.mkdir(exist_ok=args.resume)
            # a full batch per step: the largest power of 2 within the k * classes images
            images = k * len(manifest["class_names"])
            batch = min(base.train.batch_size, 1 << (images.bit_length() - 1))
            kid = min(base.evaluate.kid_subset_size, images)  # the real side has `images`
            # a featurenet (evaluate's features, CAS) with at least augment.min_steps steps
            per_epoch = math.ceil(images / base.featurenet.batch_size)
            epochs = max(base.featurenet.epochs, math.ceil(base.augment.min_steps / per_epoch))
            overrides = [
                *args.overrides,
                "featurenet.min_skill=0",
                "augment.shots=[all]",
                f"train.batch_size={batch}",
                f"evaluate.kid_subset_size={kid}",
                f"featurenet.epochs={epochs}",
            ]
            params = load_params(write_params(sub, args, image_dir), overrides)
            subset_prepared(base.prepare.out_dir, Path(params.prepare.out_dir), k, seed)
            runs[f"{args.name}-k{k}"] = run_stages(params) | {
                "train_batch_size": batch,
                "featurenet_epochs": epochs,
            }
    finally:
        os.chdir(cwd)
    for name, run in runs.items():
        print_report(name, run)
        target = GRIDS / f"augment-{name}.png"
        shutil.copyfile(Path(run["out_dir"]) / AUGMENT_PLOT, target)
        print(f"plot: {target}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"workdir": str(workdir), "runs": runs}, indent=2) + "\n")
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
