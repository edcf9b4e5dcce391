"""The `augment` stage: how much do a generator's images help a classifier that has only k
real images per class? Measured, not assumed.

For each k of `augment.shots` (`all`: the whole train split) and each of `augment.seeds`
seeds (a seeded, class-stratified subset of the real train split, the weights and the data
order), the featurenet recipe (pipeline/featurenet.py) is trained on:

    real        the k real images per class alone
    classical   the same with classical augmentation (`augment.classical`: DiffAugment's
                color, translation and cutout, and flips for RGB images) - the honest baseline
    <r>x        the same real images plus r * k synthetic images per class from each
                candidate's generator (`augment.ratios`)

and tested on the real test split. Every setting of one k trains the same number of steps
(augment.epochs passes over the largest of its training sets, at least augment.min_steps),
so that a gain is the data's, not more training's. Synthetic labels come from the generator
for conditional models; for unconditional ones from the `real` classifier of the same k and
seed (pseudo-labels kept at softmax >= augment.min_confidence), so no setting uses labels
beyond its k per class. CAS (Ravuri & Vinyals 2019) is the recipe trained on synthetic images
only (as many as the real train split; unconditional ones labeled by the featurenet), for
every generator, conditional or not.

What it does not measure: the generators were trained on the whole train split's images
(and labels, if conditional), so the figures answer "do a GAN's images of plentiful unlabeled
data help when labels are scarce?" For "does a GAN trained on k images per class help?",
train the generator on the subset (bench/augment.py does).

Reported per setting and k: accuracy mean and std over seeds, and per generator the gain over
`real` and over `classical` (mean and std of the seed-paired differences; `exceeds_spread`
when the mean is beyond one std). The headline figures average over the shots: augment_gain
(the largest ratio against real; register.metric may be it), augment_gain_vs_classical,
augment_cas.

Outputs: `augment.out_dir`/report.json, accuracy.csv (the DVC plot: accuracy against k per
setting) and accuracy.png; `augment.metrics_dir`: real.json, classic.json and c<i>.json per
candidate, each an `accuracy` (the mean over the shots), so `dvc metrics show` puts the three
side by side; and each candidate's MLflow run gets the figures and the plot.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from gan.augment import diff_augment
from gan.export import load_generator
from gan.sampling import mix_seed
from pipeline.artifacts import (
    AUGMENT_METRICS_DIR_KEY,
    AUGMENT_OUT_DIR_KEY,
    AUGMENT_OUTPUTS,
    AUGMENT_PLOT,
    AUGMENT_REPORT,
    AUGMENT_STAGE,
    AUGMENT_TABLE,
    GENERATORS,
    is_score,
    list_candidates,
)
from pipeline.config import Params
from pipeline.console import say
from pipeline.data import PreparedSplit
from pipeline.errors import EvaluationError
from pipeline.featurenet import accuracy, fit_classifier, load_featurenet
from pipeline.files import check_output_dir, replace_entries, staging_dir, write_json
from pipeline.metrics_files import check_metrics_dir, figure, write_metrics_dir
from pipeline.synthetic import class_counts, draw, pseudo_labels
from pipeline.tracking import candidate_runs, check_reachable, tracking_uri

BASELINES = ("real", "classical")
DRAWS_PER_IMAGE = 10  # unconditional: samples drawn per synthetic image wanted, at most
CHUNK = 1024
log = logging.getLogger(__name__)


def ratio_name(ratio: float) -> str:
    return f"{ratio:g}x"


def shot_name(shot) -> str:
    return "all" if shot == "all" else f"k{shot}"


def classical_transforms(params: Params, channels: int) -> tuple[str, ...]:
    """augment.classical, with `auto` resolved: flips only for RGB images."""
    chosen = params.augment.classical
    if chosen != "auto":
        return tuple(chosen)
    return ("color", "translation", "cutout") + (("flip",) if channels == 3 else ())


def classical(transforms: tuple[str, ...]):
    """The batch transform of the classical setting: horizontal flips (half the images) and
    DiffAugment's transforms, drawn from the training loop's generator."""
    policies = [t for t in transforms if t != "flip"]

    def transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if "flip" in transforms:
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return diff_augment(x, policies, generator) if policies else x

    return transform


def subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Row indices of `per_class` images of each class (None: all), drawn by `seed`."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rows.append(members if per_class is None else rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(rows))


def synthetic_set(generator, spec, quota: np.ndarray, seed: int, labeler=None,
                  min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """`quota[c]` images of each class c from the generator: drawn with their labels when it
    is conditional, else drawn unlabeled and kept where `labeler` (a FeatureNet) is sure
    enough; (images, labels, {drawn, kept, short: images missing per class})."""
    if spec.num_classes:
        labels = np.repeat(np.arange(len(quota)), quota)
        images = draw(generator, spec, len(labels), seed, labels)
        return images, labels, {"drawn": len(labels), "kept": len(labels), "short": 0}
    wanted, drawn = quota.copy(), 0
    shape = (spec.resolution, spec.resolution, spec.channels)
    parts = [(np.empty((0, *shape), np.uint8), np.empty(0, np.int64))]
    while wanted.sum() and drawn < DRAWS_PER_IMAGE * quota.sum():
        images = draw(generator, spec, CHUNK, mix_seed(seed, drawn))
        kept, labels = pseudo_labels(labeler, images, min_confidence)
        drawn += CHUNK
        for label in np.flatnonzero(wanted):
            rows = kept[labels == label][: wanted[label]]
            wanted[label] -= len(rows)
            parts.append((images[rows], np.full(len(rows), label)))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images.astype(np.uint8), labels.astype(np.int64), {
        "drawn": drawn, "kept": len(labels), "short": int(wanted.sum())
    }  # fmt: skip


def _spread(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "runs": [float(v) for v in array]}


def _gain(runs: list[float], baseline: list[float]) -> dict:
    """The seed-paired difference (the same real subset on both sides)."""
    paired = _spread([a - b for a, b in zip(runs, baseline, strict=True)])
    paired["exceeds_spread"] = bool(abs(paired["mean"]) > paired["std"])
    return paired


def _protocol(params: Params, manifest: dict, shots: dict, transforms) -> dict:
    a, f = params.augment, params.featurenet
    protocol = {
        "shots": {name: s["per_class"] for name, s in shots.items()},
        "ratios": list(a.ratios),
        "seeds": a.seeds,
        "seed": a.seed,
        "classical": list(transforms),
        "min_confidence": a.min_confidence,
        "steps": {name: s["steps"] for name, s in shots.items()},
        "recipe": f.model_dump(mode="json", include={"batch_size", "lr", "width", "feature_dim"}),
        "dataset_hash": manifest["dataset_hash"],
    }
    protocol["id"] = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()
    return protocol


def shot_settings(params: Params, labels: np.ndarray) -> dict:
    """name -> per_class (None: all), real images and steps, for each k that is not the whole
    split already (a k at or above the largest class is `all`)."""
    a, f = params.augment, params.featurenet
    largest = int(np.bincount(labels).max())
    shots = {}
    for shot in a.shots:
        per_class = None if shot == "all" or shot >= largest else shot
        name = shot_name("all" if per_class is None else per_class)
        if name in shots:
            continue
        real = len(subset(labels, per_class, 0))
        biggest = real * (1 + max(a.ratios))
        steps = max(a.min_steps, a.epochs * math.ceil(biggest / f.batch_size))
        shots[name] = {"per_class": per_class or "all", "real_images": real, "steps": steps}
    return shots


def augment(params: Params) -> dict:
    """Measure every candidate's augmentation value; write the report, plot and metrics."""
    a = params.augment
    # before any work: an output path it may not replace
    check_output_dir(a.out_dir, AUGMENT_STAGE, AUGMENT_OUT_DIR_KEY, names=AUGMENT_OUTPUTS)
    check_metrics_dir(a.metrics_dir, AUGMENT_STAGE, AUGMENT_METRICS_DIR_KEY)
    if not a.enabled:
        report = {"enabled": False, "candidates": {}}
        _write(params, report, {})
        return report
    train = PreparedSplit(params.prepare.out_dir, "train")
    test = PreparedSplit(params.prepare.out_dir, "test")
    images, labels = train.read()
    test_images, test_labels = test.read()
    num_classes = len(train.class_names)
    if num_classes < 2 or (labels < 0).any() or (test_labels < 0).any():
        raise EvaluationError(
            f"augment measures classifiers, which need labeled data, but {params.prepare.out_dir} "
            "is unlabeled; label it (prepare.image_labels: folders) or set augment.enabled: false"
        )
    uri = tracking_uri(params)
    check_reachable(uri)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generators = _generators(params, device)
    featurenet = None
    if any(spec.num_classes == 0 for _, spec, _ in generators.values()):
        featurenet = load_featurenet(params.featurenet.out_dir)[0].to(device)  # CAS labels
    transforms = classical_transforms(params, train.shape[2])
    shots = shot_settings(params, labels)
    protocol = _protocol(params, train.manifest, shots, transforms)
    tick = time.perf_counter()

    def fit(x, y, steps, seed, transform=None) -> torch.nn.Module:
        recipe = params.featurenet.model_copy(update={"seed": seed})
        return fit_classifier(x, y, num_classes, recipe, device, steps=steps, transform=transform)

    def score(net) -> float:
        return accuracy(net, test_images, test_labels)

    runs: dict = {b: {k: [] for k in shots} for b in BASELINES}
    synthetic: dict = {n: {ratio_name(r): {k: [] for k in shots} for r in a.ratios}
                       for n in generators}  # fmt: skip
    drawn: dict = {n: {"drawn": 0, "kept": 0, "short": 0} for n in generators}
    for name, shot in shots.items():
        per_class = None if shot["per_class"] == "all" else shot["per_class"]
        for s in range(a.seeds):
            seed = mix_seed(a.seed, s)
            rows = subset(labels, per_class, seed)
            x, y, steps = images[rows], labels[rows], shot["steps"]
            real_net = fit(x, y, steps, seed)
            runs["real"][name].append(score(real_net))
            runs["classical"][name].append(score(fit(x, y, steps, seed, classical(transforms))))
            quota_per_real = np.bincount(y, minlength=num_classes)
            for candidate, (generator, spec, _) in generators.items():
                for ratio in a.ratios:
                    quota = np.ceil(quota_per_real * ratio).astype(np.int64)  # >= 1 each
                    fake_x, fake_y, stats = synthetic_set(
                        generator, spec, quota, mix_seed(seed, int(ratio * 1000)), real_net,
                        a.min_confidence,
                    )  # fmt: skip
                    for key in stats:
                        drawn[candidate][key] += stats[key]
                    net = fit(np.concatenate([x, fake_x]), np.concatenate([y, fake_y]), steps, seed)
                    synthetic[candidate][ratio_name(ratio)][name].append(score(net))
            say("augment", f"{name} seed {s + 1}/{a.seeds}: " + ", ".join(
                f"{b} {runs[b][name][-1]:.3f}" for b in BASELINES
            ) + "".join(
                f", {c} {ratio_name(r)} {synthetic[c][ratio_name(r)][name][-1]:.3f}"
                for c in generators for r in a.ratios
            ))  # fmt: skip
    cas = {n: _cas(params, g, spec, featurenet, len(images), score, fit)
           for n, (g, spec, _) in generators.items()}  # fmt: skip
    report = _report(params, protocol, shots, runs, synthetic, drawn, cas, generators)
    report["generator_training_images"] = len(images)
    report["seconds"] = round(time.perf_counter() - tick, 2)
    say("augment", _headline(report))
    _write(params, report, _metrics(report))
    _log_to_runs(uri, report, Path(a.out_dir))
    return report


def _generators(params: Params, device) -> dict:
    """name -> (generator, spec, info) of each candidate the evaluate stage exported, in the
    train stage's order (the order of c1, c2, ...)."""
    found = {}
    for candidate in list_candidates(params.train.out_dir):
        directory = Path(params.evaluate.out_dir) / GENERATORS / candidate.name
        if candidate.diverged or not directory.is_dir():
            continue
        generator, spec, info = load_generator(directory)
        found[candidate.name] = (generator.to(device), spec, info)
    if not found:
        raise EvaluationError(
            f"no exported generator in {Path(params.evaluate.out_dir) / GENERATORS}: run the "
            "evaluate stage first (dvc repro evaluate)"
        )
    return found


def _cas(params: Params, generator, spec, featurenet, n: int, score, fit) -> dict:
    """Classification Accuracy Score over the seeds: the recipe trained on `n` synthetic
    images only: balanced for a conditional generator; an unconditional one's in the classes
    the featurenet gives them (confident ones only), so a dropped mode lowers the score."""
    a, f = params.augment, params.featurenet
    runs = []
    for s in range(a.seeds):
        seed = mix_seed(a.seed, s, 1)
        if spec.num_classes:
            quota = class_counts(n, [1.0] * spec.num_classes)
            x, y, _ = synthetic_set(generator, spec, quota, seed)
        else:
            x, y = _confident(generator, spec, n, seed, featurenet, a.min_confidence)
        steps = f.epochs * math.ceil(max(len(y), 1) / f.batch_size)
        enough = len(y) == n and len(np.unique(y)) > 1
        runs.append(score(fit(x, y, steps, seed)) if enough else None)
    labels = "conditioning" if spec.num_classes else "featurenet pseudo-labels"
    if None in runs:
        reason = "too few samples the featurenet labels confidently (or all in one class)"
        return {"mean": None, "std": None, "runs": [], "images": n, "labels": labels,
                "reason": reason}  # fmt: skip
    return _spread(runs) | {"images": n, "labels": labels}


def _confident(generator, spec, n: int, seed: int, net, min_confidence: float):
    """`n` samples `net` labels with at least `min_confidence` (fewer if DRAWS_PER_IMAGE * n
    draws do not give them), with those labels."""
    parts, kept, drawn = [], 0, 0
    while kept < n and drawn < DRAWS_PER_IMAGE * n:
        images = draw(generator, spec, CHUNK, mix_seed(seed, drawn))
        rows, labels = pseudo_labels(net, images, min_confidence)
        parts.append((images[rows][: n - kept], labels[: n - kept]))
        kept, drawn = kept + len(parts[-1][1]), drawn + CHUNK
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _report(params, protocol, shots, runs, synthetic, drawn, cas, generators) -> dict:
    a = params.augment
    baselines = {b: {k: _spread(v) for k, v in runs[b].items()} for b in BASELINES}
    candidates = {}
    top = ratio_name(max(a.ratios))
    for name, (_, spec, info) in generators.items():
        per_ratio = {r: {k: _spread(v) for k, v in ks.items()} for r, ks in synthetic[name].items()}
        gain = {r: {k: _gain(v, runs["real"][k]) for k, v in ks.items()}
                for r, ks in synthetic[name].items()}  # fmt: skip
        versus = {r: {k: _gain(v, runs["classical"][k]) for k, v in ks.items()}
                  for r, ks in synthetic[name].items()}  # fmt: skip
        stats = drawn[name]
        candidates[name] = {
            "mlflow_run_id": info.get("mlflow_run_id"),
            "task": spec.task,
            "labels": "conditioning"
            if spec.num_classes
            else "pseudo-labels of the real classifier",
            "synthetic": per_ratio,
            "gain": gain,
            "gain_vs_classical": versus,
            "cas": cas[name],
            "rejected_share": 1 - stats["kept"] / stats["drawn"] if stats["drawn"] else 0.0,
            "short_images": stats["short"],
            "augment_gain": float(np.mean([g["mean"] for g in gain[top].values()])),
            "augment_gain_vs_classical": float(np.mean([g["mean"] for g in versus[top].values()])),
            "augment_cas": cas[name]["mean"],  # None: no CAS (see cas.reason)
            "accuracy": float(np.mean([v["mean"] for v in per_ratio[top].values()])),
        }
    return {
        "enabled": True,
        "protocol": protocol,
        "shots": shots,
        "headline_ratio": top,
        "baselines": baselines,
        "candidates": candidates,
        "note": "the generators were trained on the whole train split: the figures measure "
        "their images' value when labels are scarce (see pipeline/augment.py)",
    }


def figure_text(figure_) -> str:
    return f"{figure_:.4f}" if is_score(figure_) else "n/a"


def _headline(report: dict) -> str:
    real = np.mean([v["mean"] for v in report["baselines"]["real"].values()])
    parts = [f"real {real:.3f}"]
    for name, c in report["candidates"].items():
        parts.append(
            f"{name}: +{report['headline_ratio']} {c['accuracy']:.3f} (gain "
            f"{c['augment_gain']:+.3f}, vs classical {c['augment_gain_vs_classical']:+.3f}), "
            f"CAS {figure_text(c['augment_cas'])}"
        )
    return "mean over the shots: " + "; ".join(parts)


def _metrics(report: dict) -> dict[str, dict]:
    """real.json, classic.json, c<i>.json: one `accuracy` each (the mean over the shots)."""

    def mean(per_shot: dict) -> float | None:
        return figure(float(np.mean([v["mean"] for v in per_shot.values()])))

    files = {
        "real": {
            "accuracy": mean(report["baselines"]["real"]),
            "seconds": figure(report["seconds"]),
        },
        "classic": {"accuracy": mean(report["baselines"]["classical"])},
    }
    for rank, result in enumerate(report["candidates"].values(), start=1):
        files[f"c{rank}"] = {"accuracy": figure(result["accuracy"])}
    return {name: {k: v for k, v in f.items() if is_score(v)} for name, f in files.items()}


def _table_rows(report: dict) -> list[dict]:
    """accuracy.csv: one row per k (x: real images per class), a column per setting."""
    rows = []
    for name, shot in report["shots"].items():
        row = {"shots": shot["real_images"], "per_class": shot["per_class"]}
        for b in BASELINES:
            row[b] = round(report["baselines"][b][name]["mean"], 5)
        for rank, result in enumerate(report["candidates"].values(), start=1):
            for ratio, per_shot in result["synthetic"].items():
                row[f"c{rank}_{ratio}"] = round(per_shot[name]["mean"], 5)
        rows.append(row)
    return rows


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_, axes = plt.subplots(figsize=(6, 4), dpi=100)
    x = [s["real_images"] for s in report["shots"].values()]
    series = {b: report["baselines"][b] for b in BASELINES}
    for rank, result in enumerate(report["candidates"].values(), start=1):
        series |= {f"c{rank} +{r}": v for r, v in result["synthetic"].items()}
    for label, per_shot in series.items():
        means = [v["mean"] for v in per_shot.values()]
        stds = [v["std"] for v in per_shot.values()]
        axes.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("real training images")
    axes.set_ylabel("test accuracy (mean ± std over seeds)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure_.tight_layout()
    figure_.savefig(path)
    plt.close(figure_)


def _write(params: Params, report: dict, metrics: dict[str, dict]) -> None:
    """report.json, accuracy.csv and accuracy.png into augment.out_dir, then the metrics."""
    a = params.augment
    staging = staging_dir(a.out_dir)
    try:
        write_json(staging / AUGMENT_REPORT, report)
        rows = _table_rows(report) if report["enabled"] else []
        with open(staging / AUGMENT_TABLE, "w", newline="") as handle:
            columns = list(rows[0]) if rows else ["shots"]
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        if report["enabled"]:
            _plot(report, staging / AUGMENT_PLOT)
        else:
            _blank_png(staging / AUGMENT_PLOT)
        replace_entries(staging, Path(a.out_dir), AUGMENT_STAGE, AUGMENT_OUT_DIR_KEY)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_metrics_dir(a.metrics_dir, metrics, AUGMENT_STAGE, AUGMENT_METRICS_DIR_KEY)


def _blank_png(path: Path) -> None:
    """The plot of a stage that measured nothing (DVC needs its declared output)."""
    from PIL import Image

    Image.new("L", (1, 1), 255).save(path)


def _log_to_runs(uri: str, report: dict, out_dir: Path) -> None:
    """Each candidate's figures (augment.*) and the plot into its MLflow training run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(uri), int(time.time() * 1000)
    for _, result, run_id in candidate_runs(client, report["candidates"]):
        values = {k: result[k] for k in ("augment_gain", "augment_gain_vs_classical",
                                         "augment_cas", "accuracy")}  # fmt: skip
        for shot in report["shots"]:
            for b in BASELINES:
                values[f"{shot}.{b}"] = report["baselines"][b][shot]["mean"]
            for ratio, per_shot in result["synthetic"].items():
                values[f"{shot}.{ratio}"] = per_shot[shot]["mean"]
        metrics = [
            Metric(f"augment.{k}", float(v), now, 0) for k, v in values.items() if is_score(v)
        ]
        client.log_batch(run_id, metrics=metrics)
        client.set_tag(run_id, "ganpipe.augment.protocol_id", report["protocol"]["id"])
        client.log_artifact(run_id, str(out_dir / AUGMENT_PLOT), "augment")
        client.log_artifact(run_id, str(out_dir / AUGMENT_REPORT), "augment")
