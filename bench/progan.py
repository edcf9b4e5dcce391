"""Progressive growing (issue 17) against the best DCGAN recipe at equal wall-clock.

Two arms train on the same prepared images, one after the other, each as one `train(...)` call
of the pipeline's own train stage (one Ray worker using both CPUs, as params.yaml ships):
- dcgan:  the shipped params with the recipe the pipeline picks for prepare.resolution
          (pipeline.recipes.recipe_for; at 32 px dcgan-classic-32);
- progan: the same with model.family progan, i.e. its recipe progan-wgangp (WGAN-GP + drift
          0.001, Adam 1e-3 (0, 0.99)), growing from model.start_resolution, the phases the
          run's images shared out (growth.py), at the widths --progan-width gives.
Equal wall-clock: before the runs, each arm's step is timed in this process (the stage's own
models, step and EMA, torch threads = ray.cpus_per_worker; progan at every resolution of its
schedule, the reals reduced by blend_reals), and train.steps is set so that the steps'
predicted time is --seconds minus --overhead (Ray's start-up and checkpoints); the train()
wall time each run took is recorded beside it (--rates gives the step rates instead, e.g.
from a --calibrate-only run at a quieter moment). Ray is shut down after every run, so each
pays its own start-up. Every seed of an arm trains the same number of steps.

Checkpoints: train.checkpoint_every = steps / --checkpoints. Ray keeps only the newest two, so
a thread copies every checkpoint out of the run's storage as soon as it is whole (read_state's
sha256 check) and records when it was reached: the mtime of its state.json relative to the
start of train() (wall-clock, Ray's start-up included), and, from the run's history, the
training seconds up to its step (sum over reports of images / images_per_s: everything from
the first step on, checkpoint writes included).

Scores: the evaluate stage's code (pipeline.scoring.Scorer under the evaluate.* params, the
featurenet, the train split's cached features; BatchNorm statistics recomputed as evaluate
does; class coverage as evaluate computes it). Every checkpoint's EMA generator: domain FID,
KID and class coverage; a progan checkpoint before the final resolution is faded in is scored
upsampled to the final size (pipeline.training.growth.AtFinalSize, nearest) and marked
`upsampled`. The last checkpoint of each run: both generators with every metric and the
evaluate stage's choice between them (pipeline.evaluate.choose_generator), the figures the
evaluate stage would report. Outputs: bench/grids/progan-NAME-fid.png (FID over wall-clock),
bench/grids/progan-NAME-ARM.png (the first seed's final generator, 64 samples), --json.

Reader throughput per phase (issue 17): for each resolution of the first progan run's
schedule, the images/s of the rank's data path (pipeline.data.RankLoader over the prepared
full-resolution shards + gan.progressive.blend_reals to that resolution, mid-fade alpha 0.5;
alpha 1 at the start resolution, which has no fade), best of 3 passes of 20,000 images after a
warm-up, with ray.cpus_per_worker torch threads, against the images/s that run's training
consumed there (median of its history's reports whose steps all trained at that resolution,
fade and stabilisation together: their step costs hardly differ). --reader-from redoes only
this table for a finished run (e.g. once the machine is quiet).

    python bench/progan.py --data digits --name digits --seeds 2 --seconds 240
    python bench/progan.py --data /work/scratch/cifar10k --channels 3 --name cifar10 \\
        --seeds 1 --seconds 240
    python bench/progan.py --reader-from /tmp/progan-digits.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from bench.peer_quality import ENVIRONMENT_OVERRIDES, write_params
from gan.ema import GeneratorEMA
from gan.progressive import Stage, apply_stage, blend_reals
from gan.sampling import LatentSampler, step_generator
from gan.step import GANTrainState, adam, train_step
from pipeline.candidates import generator_from_checkpoint, generator_spec
from pipeline.checkpoint import CheckpointError, read_checkpoint, read_state
from pipeline.cluster import storage_root
from pipeline.config import Params, load_params
from pipeline.config.growth import growth_schedule, images_shown
from pipeline.data import PreparedSplit, RankLoader, to_float
from pipeline.errors import EvaluationError
from pipeline.evaluate import choose_generator, prepared_generator
from pipeline.featurenet import load_featurenet, read_featurenet_info, train_featurenet
from pipeline.fidelity import real_images
from pipeline.prepare import prepare
from pipeline.recipes import recipe_for
from pipeline.scoring import ALL_METRICS, Scorer, class_figures, domain_extractor, sample_images
from pipeline.train import train
from pipeline.training.checkpoints import read_history
from pipeline.training.growth import AtFinalSize
from pipeline.training.identity import run_name
from pipeline.training.loop import build_models, step_config

GRIDS = Path(__file__).resolve().parent / "grids"
ARMS = ("dcgan", "progan")
GRID_IMAGES = 64
CALIBRATION_STEPS, CALIBRATION_WARMUP = 6, 2  # timed and untimed steps per resolution
READER_IMAGES = 20_000  # images per timed pass of the reader
FADE_ALPHA = 0.5  # the reader's blend in a fade-in phase (mid-fade)
CURVE_METRICS = ("fid", "kid")  # per checkpoint; the last one gets ALL_METRICS
POLL_S = 0.5


def arm_overrides(arm: str, args: argparse.Namespace) -> list[str]:
    """What distinguishes an arm from the shipped params (+ --set)."""
    if arm == "dcgan":
        return []
    width = args.progan_width
    return ["model.family=progan", f"model.g_width={width}", f"model.d_width={width}"]


def resolutions(params: Params) -> list[int]:
    """The resolutions an arm trains at: progan's schedule from its start, else the final."""
    final = params.prepare.resolution
    if params.model.family != "progan":
        return [final]
    start = params.model.start_resolution
    return [start << k for k in range(int(math.log2(final // start)) + 1)]


def step_rates(params: Params, device: str = "cpu") -> dict[int, float]:
    """Real images/s of the stage's own training step (models, loss, EMA) at each resolution
    of the arm, in this process with ray.cpus_per_worker threads (the worker's)."""
    torch.set_num_threads(max(1, int(params.ray.cpus_per_worker)))
    data = PreparedSplit(params.prepare.out_dir, "train")
    t = params.train
    torch.manual_seed(t.seed)
    g, d = build_models(params, data.shape, 0)
    state = GANTrainState(
        g, d, adam(g.parameters(), t.lr_g, (t.beta1, t.beta2)),
        adam(d.parameters(), t.lr_d, (t.beta1, t.beta2)),
        GeneratorEMA(g, t.ema_kimg * 1000, t.batch_size, t.ema_rampup),
    )  # fmt: skip
    cfg, sampler = step_config(params, torch.device(device)), LatentSampler(params.model.z_dim)
    loader = RankLoader(data, t.batch_size, 0, 1, t.seed)
    rates = {}
    for resolution in resolutions(params):
        if params.model.family == "progan":
            apply_stage(Stage(resolution, 1.0, 0), g, d, state.ema.model)
        reals = ((blend_reals(x, resolution), y) for x, y in loader.forever())
        for step in range(CALIBRATION_WARMUP):
            train_step(state, reals, cfg, sampler, step_generator(0, 0, step), step)
        tick = time.perf_counter()
        for step in range(CALIBRATION_STEPS):
            train_step(state, reals, cfg, sampler, step_generator(0, 0, step), step)
        images = CALIBRATION_STEPS * t.batch_size * t.n_critic
        rates[resolution] = images / (time.perf_counter() - tick)
    return rates


def steps_for(params: Params, rates: dict[int, float], seconds: float) -> int:
    """train.steps whose predicted step time is `seconds` at `rates` (progan: the phases of
    the images-shared-out schedule, the last twice as long; a fade timed at its resolution)."""
    per_image = 1 / rates[params.prepare.resolution]  # seconds per real image, averaged
    if params.model.family == "progan":
        shares = [rates[resolutions(params)[0]]]  # the first stabilising phase
        for resolution in resolutions(params)[1:]:
            shares += [rates[resolution], rates[resolution]]  # fade, stabilise
        shares.append(rates[params.prepare.resolution])  # the last phase counts twice
        per_image = statistics.mean(1 / r for r in shares)
    t = params.train
    images_per_step = t.batch_size * params.ray.num_workers * t.n_critic
    return max(1, round(seconds / per_image / images_per_step))


class CheckpointKeeper(threading.Thread):
    """Copies every whole checkpoint of a Ray run out of its storage (Ray keeps two) into
    `keep`, recording its step and when it was written relative to `start` (time.time())."""

    def __init__(self, run_dir: Path, keep: Path, start: float):
        super().__init__(daemon=True)
        self.run_dir, self.keep, self.began = run_dir, keep, start
        self.kept: dict[str, dict] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.poll()
            self.stopping.wait(POLL_S)
        self.poll()

    def poll(self) -> None:
        for directory in sorted(self.run_dir.glob("checkpoint_*")):
            if directory.name in self.kept:
                continue
            try:
                meta = read_state(directory)  # whole: its weights match the sha256 it records
                written = (directory / "state.json").stat().st_mtime - self.began
                target = self.keep / f"step_{meta['step']:07d}"
                shutil.copytree(directory, target, dirs_exist_ok=True)
                read_state(target)
            except (CheckpointError, OSError, ValueError, KeyError):
                continue  # still being written (or removed by Ray): the next poll decides
            self.kept[directory.name] = {
                "step": meta["step"],
                "path": str(target),
                "wall_s": written,
                "stage": meta.get("stage"),
            }

    def stop(self) -> list[dict]:
        self.stopping.set()
        self.join()
        return sorted(self.kept.values(), key=lambda c: c["step"])


def training_seconds(history: list[dict], params: Params) -> dict[int, float]:
    """Seconds of training up to each reported step, from the history's images_per_s."""
    t = params.train
    per_step = t.batch_size * params.ray.num_workers * t.n_critic
    elapsed, previous, at = 0.0, 0, {}
    for row in history:
        step = int(row["step"])
        if row.get("images_per_s"):
            elapsed += (step - previous) * per_step / row["images_per_s"]
        at[step], previous = elapsed, step
    return at


def run_arm(params: Params, dataset_hash: str, keep: Path) -> dict:
    """One train() call with its checkpoints kept; its timings and checkpoints."""
    import ray

    run_dir = Path(storage_root(params)) / run_name(params, dataset_hash)
    if run_dir.exists():  # a scratch workdir: never resume an earlier run of this name
        shutil.rmtree(run_dir)
    start = time.time()
    keeper = CheckpointKeeper(run_dir, keep, start)
    keeper.start()
    try:
        summary = train(params)
    finally:
        checkpoints = keeper.stop()
        ray.shutdown()
    seconds = time.time() - start
    history = read_history(Path(params.train.out_dir) / "history.csv")
    at = training_seconds(history, params)
    for checkpoint in checkpoints:
        checkpoint["train_s"] = at.get(checkpoint["step"])
    return {
        "train_call_s": seconds,
        "steps": summary["steps"],
        "diverged": summary["diverged"],
        "checkpoints": checkpoints,
        "history": history,
        "final_images_per_s": statistics.median(r["images_per_s"] for r in history),
    }


class Scoring:
    """The evaluate stage's scorer, featurenet and real train split for one prepared dataset."""

    def __init__(self, params: Params, manifest: dict):
        self.params, self.manifest = params, manifest
        c = params.evaluate
        self.net, info = load_featurenet(params.featurenet.out_dir)
        extractors = {"domain": domain_extractor(params.featurenet.out_dir, info)}
        self.scorer = Scorer(c, extractors, manifest["dataset_hash"])
        pixels, self.labels = PreparedSplit(params.prepare.out_dir, c.split, verify=False).read()
        self.real = real_images(pixels)
        self.featurenet_accuracy = info.get("test_accuracy")

    def floor(self) -> float:
        """Domain FID of the real test split against the real train split (evaluate's floor)."""
        test, _ = PreparedSplit(self.params.prepare.out_dir, "test", verify=False).read()
        return self.scorer.score(to_float(test), self.real, "train", ("fid",))["fid_domain"]

    def generator(self, checkpoint: str, params: Params, which: str):
        """A checkpoint's generator as evaluate loads it, or, for a progan checkpoint short of
        the final resolution, the growing generator at its stage shown at the final size;
        (generator, spec, upsampled)."""
        tensors, meta = read_checkpoint(Path(checkpoint))
        stage, final = meta.get("stage"), params.prepare.resolution
        if stage is None or (stage["resolution"], stage["alpha"]) == (final, 1.0):
            generator, spec, _ = generator_from_checkpoint(checkpoint, self.manifest, which)
            return generator, spec, False
        shape = tuple(self.manifest["shape"])
        spec = generator_spec(params.model.model_dump(mode="json"), shape, 0)
        generator, _ = build_models(params, shape, 0)
        prefix = "generator_ema." if which == "ema" else "generator."
        generator.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()
                                   if k.startswith(prefix)})  # fmt: skip
        generator.set_stage(stage["resolution"], stage["alpha"])
        return AtFinalSize(generator.eval(), final), spec, True

    def score(self, generator, spec, metrics=CURVE_METRICS) -> tuple[dict, torch.Tensor]:
        """The evaluate stage's figures of a generator (BatchNorm statistics recomputed)."""
        c = self.params.evaluate
        ready = prepared_generator(generator, spec, c.seed)
        fake = sample_images(ready, spec, c.num_samples, c)
        scores = self.scorer.score(fake, self.real, c.split, metrics)
        return scores | class_figures(self.net, fake, spec.num_classes, self.labels), fake


def score_run(scoring: Scoring, params: Params, run: dict) -> None:
    """Every kept checkpoint's EMA generator (curve), then the last one as evaluate would."""
    for checkpoint in run["checkpoints"]:
        tick = time.perf_counter()
        generator, spec, upsampled = scoring.generator(checkpoint["path"], params, "ema")
        scores, _ = scoring.score(generator, spec)
        checkpoint |= {"upsampled": upsampled, "score_s": time.perf_counter() - tick, **scores}
        print(f"  step {checkpoint['step']:>6} wall {checkpoint['wall_s']:6.1f} s "
              f"stage {checkpoint['stage']}: fid_domain {scores['fid_domain']:.3f}"
              f"{' (upsampled)' if upsampled else ''}", flush=True)  # fmt: skip
    last = run["checkpoints"][-1]
    by_generator, samples = {}, {}
    for which in ("ema", "raw"):
        generator, spec, _ = scoring.generator(last["path"], params, which)
        by_generator[which], samples[which] = scoring.score(generator, spec, ALL_METRICS)
    choice = choose_generator(by_generator, params.register.metric, params.evaluate.generator)
    run["final"] = {
        "step": last["step"],
        "generator": choice["generator"],
        "generator_choice": choice,
        **by_generator[choice["generator"]],
        "by_generator": by_generator,
    }
    run["grid"] = samples[choice["generator"]][:GRID_IMAGES]


def reader_table(params: Params, history: list[dict]) -> list[dict]:
    """Per resolution of the schedule: images/s of the rank's data path (RankLoader over the
    full-resolution shards + blend_reals, mid-fade alpha; alpha 1 at the start resolution)
    against the median images/s of the history's reports whose steps all trained at it."""
    torch.set_num_threads(max(1, int(params.ray.cpus_per_worker)))
    schedule = growth_schedule(params)
    data = PreparedSplit(params.prepare.out_dir, "train")
    batch = params.train.batch_size
    loader = RankLoader(data, batch, 0, params.ray.num_workers, 0)
    batches = math.ceil(READER_IMAGES / batch)
    consumed: dict[int, list[float]] = {}
    previous = 0
    for row in history:  # each report's images/s covers the steps since the one before
        step = int(row["step"])
        low = schedule.at(images_shown(params, previous)).resolution
        if low == schedule.at(images_shown(params, step - 1)).resolution:
            consumed.setdefault(low, []).append(row["images_per_s"])
        previous = step
    rows = []
    for resolution in resolutions(params):
        alpha = 1.0 if resolution == params.model.start_resolution else FADE_ALPHA
        stream = loader.forever()

        def timed_pass(stream=stream, resolution=resolution, alpha=alpha) -> float:
            tick = time.perf_counter()
            for _ in range(batches):
                images, _ = next(stream)
                blend_reals(images, resolution, alpha)
            return batches * batch / (time.perf_counter() - tick)

        timed_pass()  # warm-up
        rate = max(timed_pass() for _ in range(3))
        train_rate = statistics.median(consumed[resolution]) if resolution in consumed else None
        rows.append({"resolution": resolution, "alpha": alpha, "reader_images_per_s": rate,
                     "train_images_per_s": train_rate,
                     "reports": len(consumed.get(resolution, []))})  # fmt: skip
    return rows


def quiet_seconds(params: Params, rates: dict[int, float], step: int) -> float:
    """Seconds the first `step` steps take at the calibrated step rates (the arm's images per
    resolution / its images/s there): training time on a machine to itself."""
    schedule, shown = growth_schedule(params), images_shown(params, step)
    if schedule is None:
        return shown / rates[params.prepare.resolution]
    total = 0.0
    for phase in schedule.phases():
        end = shown if phase.end is None else min(shown, phase.end)
        total += max(0, end - phase.start) / rates[phase.resolution]
    return total


def add_quiet_seconds(results: dict, runs: dict[str, tuple[Params, dict]]) -> None:
    """Each checkpoint's quiet_s (quiet_seconds at the rates the runs were sized with)."""
    for params, run in runs.values():
        rates = {int(k): v for k, v in results["rates"][run["arm"]].items()}
        for checkpoint in run["checkpoints"]:
            checkpoint["quiet_s"] = quiet_seconds(params, rates, checkpoint["step"])


def plot_curves(results: dict, path: Path) -> None:
    """Domain FID of every checkpoint, one line per arm and seed, over train()'s wall-clock
    (left) and over the calibrated training seconds (right); hollow markers: a progan
    checkpoint scored upsampled from a lower stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dcgan": "tab:blue", "progan": "tab:red"}
    axes_x = (
        ("wall_s", "seconds since train() was called (state.json mtime)"),
        ("quiet_s", "training seconds at the calibrated step rates"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (key, label) in zip(axes, axes_x, strict=True):
        for run in results["runs"].values():
            arm, seed = run["arm"], run["seed"]
            points = [p for p in run["checkpoints"] if key in p]
            xs, ys = [p[key] for p in points], [p["fid_domain"] for p in points]
            ax.plot(xs, ys, "-" if seed == 0 else "--", color=colours[arm],
                    label=f"{arm} seed {seed}")  # fmt: skip
            for p in points:
                face = "white" if p.get("upsampled") else colours[arm]
                ax.plot(p[key], p["fid_domain"], "o", color=colours[arm], markerfacecolor=face)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("domain FID (EMA generator, evaluate protocol)")
    axes[0].legend()
    fig.suptitle(f"{results['name']}, {results['resolution']} px; hollow: progan below the "
                 "final stage, shown upsampled (AtFinalSize)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(path: Path) -> None:
    """quiet_s, the plot and the tables again from a results file (updated in place)."""
    results = json.loads(path.read_text())
    workdir = Path(results["workdir"])
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        runs = {key: (load_params(workdir / "params.yaml", run["overrides"]), run)
                for key, run in results["runs"].items()}  # fmt: skip
    finally:
        os.chdir(cwd)
    add_quiet_seconds(results, runs)
    plot = GRIDS / f"progan-{results['name']}-fid.png"
    plot_curves(results, plot)
    print(f"plot: {plot}")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)


def print_tables(results: dict) -> None:
    print(f"\n{results['name']} {results['resolution']} px: floor {results['fid_floor']:.3f}, "
          f"featurenet test accuracy {results['featurenet_test_accuracy']:.3f}")  # fmt: skip
    print("\nrun: recipe, widths, steps, predicted step s, train() s, median img/s")
    for key, run in results["runs"].items():
        print(
            f"  {key}: {run['recipe']}, g/d width {run['widths']}, {run['steps']} steps "
            f"(checkpoint every {run['checkpoint_every']}), predicted {run['predicted_s']:.0f}"
            f" s, train() {run['train_call_s']:.1f} s, {run['final_images_per_s']:.0f} img/s"
        )
    print("\ncurves (EMA): step, wall s, train s, quiet s, stage, fid_domain, kid_domain, "
          "coverage")  # fmt: skip
    for key, run in results["runs"].items():
        print(f"  {key}")
        for p in run["checkpoints"]:
            stage = p["stage"] and f"{p['stage']['resolution']}/{p['stage']['alpha']:.2f}"
            print(
                f"    {p['step']:>6} {p['wall_s']:7.1f} {p['train_s'] or 0:7.1f} "
                f"{p.get('quiet_s', float('nan')):7.1f} "
                f"{stage or '-':>9} {p['fid_domain']:9.3f} {p['kid_domain']:8.4f} "
                f"{p['class_coverage_domain']:.1f}{'  upsampled' if p['upsampled'] else ''}"
            )
    print(
        "\nfinal (evaluate's choice of EMA/raw): fid_domain, kid_domain, is, precision, "
        "recall, coverage"
    )
    finals: dict[str, list[dict]] = {}
    for key, run in results["runs"].items():
        f = run["final"]
        finals.setdefault(run["arm"], []).append(f)
        print(
            f"  {key}: {f['generator']} {f['fid_domain']:.3f} {f['kid_domain']:.4f} "
            f"{f['is_domain']:.3f} {f['precision_domain']:.3f} {f['recall_domain']:.3f} "
            f"{f['class_coverage_domain']:.2f}"
        )
    for arm, fs in finals.items():
        values = [f["fid_domain"] for f in fs]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(
            f"  {arm}: fid_domain mean {statistics.mean(values):.3f} std {spread:.3f} "
            f"over {len(values)} seed(s)"
        )
    if results.get("reader"):
        print_reader(results["reader"])


def print_reader(rows: list[dict]) -> None:
    print("\nreader per resolution: resolution, alpha, reader img/s, train img/s (reports), ratio")
    for r in rows:
        train_rate = r["train_images_per_s"]
        ratio = r["reader_images_per_s"] / train_rate if train_rate else float("nan")
        print(
            f"  {r['resolution']:>4} {r['alpha']:.1f} {r['reader_images_per_s']:>10,.0f} "
            f"{train_rate or float('nan'):>8,.0f} ({r['reports']}) {ratio:>8,.0f}x"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="'digits', or an image folder with one subfolder per class")
    parser.add_argument("--resolution", type=int, default=32, help="prepared side, a power of 2")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--name", help="bench/grids/progan-NAME-*.png")
    parser.add_argument("--workdir", type=Path, help="scratch dir (default: /tmp/progan-NAME)")
    parser.add_argument("--seeds", type=int, default=2, help="train.seed 0..N-1 per arm")
    parser.add_argument("--seconds", type=float, default=240, help="train() budget per run")
    parser.add_argument(
        "--overhead", type=float, default=20, help="of --seconds, not stepping (Ray, checkpoints)"
    )
    parser.add_argument("--checkpoints", type=int, default=10, help="checkpoints per run")
    parser.add_argument("--progan-width", type=int, default=64, help="progan g_width = d_width")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one param for both arms (repeatable)",
    )  # fmt: skip
    parser.add_argument("--calibrate-only", action="store_true", help="print the step rates")
    parser.add_argument(
        "--rates", type=json.loads, metavar="JSON",
        help='step images/s to size the runs with instead of timing them here, e.g. '
        '\'{"dcgan": {"32": 881}, "progan": {"4": 2986, "8": 1537, "16": 439, "32": 101}}\' '
        "(a calibration from a quieter moment: the machine is shared)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--reader-from", type=Path, metavar="JSON",
        help="only the reader table, for the first progan run of this --json file (its "
        "workdir, params and history); the table is added to the file",
    )  # fmt: skip
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="only the calibrated seconds, the plot and the tables again, from a --json file",
    )
    args = parser.parse_args()
    if not (args.reader_from or args.replot) and not (args.data and args.name):
        parser.error("--data and --name are required (unless --reader-from or --replot)")
    return args


def reader_from(path: Path) -> None:
    """The reader table of the first progan run a results file holds, added to it."""
    results = json.loads(path.read_text())
    run = next(r for r in results["runs"].values() if r["arm"] == "progan")
    workdir = Path(results["workdir"])
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        params = load_params(workdir / "params.yaml", run["overrides"])
        results["reader"] = reader_table(params, run["history"])
    finally:
        os.chdir(cwd)
    print_reader(results["reader"])
    path.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    if args.reader_from:
        reader_from(args.reader_from)
        return
    if args.replot:
        replot(args.replot)
        return
    for name in ENVIRONMENT_OVERRIDES:  # a local Ray, checkpoints and tracking in the workdir
        os.environ.pop(name, None)
    workdir = (args.workdir or Path(f"/tmp/progan-{args.name}")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    image_dir = None if args.data == "digits" else Path(args.data).resolve()
    params_file = write_params(workdir, args, image_dir)
    print(f"workdir {workdir}, params {params_file}", flush=True)
    GRIDS.mkdir(exist_ok=True)
    cwd, begin = Path.cwd(), time.perf_counter()
    os.chdir(workdir)
    try:
        results = run_benchmark(args, params_file, workdir)
    finally:
        os.chdir(cwd)
    results["total_s"] = time.perf_counter() - begin
    if args.json:
        args.json.write_text(json.dumps({"workdir": str(workdir), **results}, indent=2) + "\n")
        print(f"figures: {args.json}")
    if results.get("runs"):
        print_tables(results)
    print(f"total {results['total_s']:.0f} s", flush=True)


def reusable_featurenet(params: Params, manifest: dict) -> bool:
    """Whether the workdir already holds a featurenet of this prepared data (a rerun)."""
    try:
        info = read_featurenet_info(params.featurenet.out_dir)
    except (EvaluationError, OSError):
        return False
    return info.get("available", False) and info.get("dataset_hash") == manifest["dataset_hash"]


def run_benchmark(args: argparse.Namespace, params_file: Path, workdir: Path) -> dict:
    timings = {}
    tick = time.perf_counter()
    base = load_params(params_file, args.overrides)
    prepared = Path(base.prepare.out_dir) / "manifest.json"
    manifest = json.loads(prepared.read_text()) if prepared.is_file() else None
    if manifest is None:
        manifest = prepare(base, progress=False)
    timings["prepare_s"] = time.perf_counter() - tick
    counts = {s: v["rows"] for s, v in manifest["splits"].items()}
    print(f"prepared {manifest['source']} {base.prepare.resolution} px: {counts}", flush=True)

    arm_params = {arm: load_params(params_file, args.overrides + arm_overrides(arm, args))
                  for arm in args.arms}  # fmt: skip
    rates = {}
    for arm, params in arm_params.items():
        if args.rates:
            rates[arm] = {int(k): float(v) for k, v in args.rates[arm].items()}
            print(f"{arm}: step images/s by resolution {rates[arm]} (--rates)", flush=True)
            continue
        tick = time.perf_counter()
        rates[arm] = step_rates(params)
        print(f"{arm}: step images/s by resolution {rates[arm]} "
              f"({time.perf_counter() - tick:.1f} s)", flush=True)  # fmt: skip
    results = {"name": args.name, "resolution": base.prepare.resolution, "rates": rates,
               "args": {k: str(v) for k, v in vars(args).items()}, "timings": timings}  # fmt: skip
    if args.calibrate_only:
        return results

    tick = time.perf_counter()
    if not reusable_featurenet(base, manifest):
        featurenet = train_featurenet(base)
        if not featurenet["available"]:
            raise SystemExit(f"featurenet: {featurenet['reason']}")
    timings["featurenet_s"] = time.perf_counter() - tick
    print(f"featurenet ready ({timings['featurenet_s']:.0f} s)", flush=True)

    runs = {}
    budget = args.seconds - args.overhead
    for seed in range(args.seeds):
        for arm, arm_base in arm_params.items():
            steps = steps_for(arm_base, rates[arm], budget)
            every = max(1, steps // args.checkpoints)
            overrides = [*args.overrides, *arm_overrides(arm, args), f"train.seed={seed}",
                         f"train.steps={steps}", f"train.checkpoint_every={every}"]  # fmt: skip
            params = load_params(params_file, overrides)
            key = f"{arm}-s{seed}"
            keep = workdir / "kept" / key
            shutil.rmtree(keep, ignore_errors=True)
            print(f"{key}: {steps} steps, checkpoint every {every}", flush=True)
            run = run_arm(params, manifest["dataset_hash"], keep)
            schedule = growth_schedule(params)
            run |= {
                "arm": arm, "seed": seed, "overrides": overrides, "steps": steps,
                "checkpoint_every": every, "predicted_s": budget,
                "recipe": recipe_for(params.prepare.resolution, params.model.family).name,
                "widths": [params.model.g_width, params.model.d_width],
                "schedule": None if schedule is None else [
                    vars(p) for p in schedule.phases()],
            }  # fmt: skip
            runs[key] = (params, run)
            print(f"{key}: train() {run['train_call_s']:.1f} s, {len(run['checkpoints'])} "
                  f"checkpoints kept", flush=True)  # fmt: skip

    tick = time.perf_counter()
    scoring = Scoring(base, manifest)
    results["fid_floor"] = scoring.floor()
    results["featurenet_test_accuracy"] = scoring.featurenet_accuracy
    for key, (params, run) in runs.items():
        print(f"scoring {key}", flush=True)
        score_run(scoring, params, run)
        if run["seed"] == 0:
            grid = GRIDS / f"progan-{args.name}-{run['arm']}.png"
            save_image(run.pop("grid").add(1).div(2).clamp(0, 1), grid, nrow=8)
            print(f"grid: {grid}")
        else:
            run.pop("grid")
    timings["scoring_s"] = time.perf_counter() - tick
    results["runs"] = {key: run for key, (_, run) in runs.items()}
    add_quiet_seconds(results, runs)
    plot = GRIDS / f"progan-{args.name}-fid.png"
    plot_curves(results, plot)
    print(f"plot: {plot}")

    progan = [(p, r) for p, r in runs.values() if r["arm"] == "progan"]
    if progan:
        params, run = progan[0]
        results["reader"] = reader_table(params, run["history"])
    return results


if __name__ == "__main__":
    main()
