"""The `evaluate` stage: FID / IS / KID / precision-recall of every candidate the train stage
produced, with torch-fidelity, under a recorded protocol.

Per candidate, both its generators (the EMA average and the raw, last-step weights) are
scored the same way: BatchNorm statistics recomputed for their own weights
(gan.ema.refresh_statistics), then `evaluate.num_samples` images from seed-fixed noise against
the real `evaluate.split` with the featurenet (`*_domain` metrics, always) and with
Inception-v3 (`*_inception`, when `evaluate.inception` is on and its weights are available;
otherwise skipped with the reason recorded), and the share of classes their samples cover
(featurenet predictions; a mode-collapse figure). The better of the two by `register.metric`
(or the one `evaluate.generator` names) is the candidate's generator: its figures are the
candidate's, it is exported, and a large gap between the two is flagged (a broken average, or
a raw generator that oscillates). For conditional generators the chosen one also gets FID per
class, how often samples show their conditioning class, and the Classification Accuracy Score
(Ravuri & Vinyals 2019): the featurenet recipe trained on generated images only, tested on
the real test split, next to the same recipe on real data.

Sanity figures frame the numbers: the FID floor (the real test split against the real train
split), the FID ceiling (an untrained generator of the same architecture) and the IS of the
real test split.

Outputs: `evaluate.metrics_file` (DVC metrics), and in `evaluate.out_dir` a sample grid per
candidate (DVC plots) and the exported generator the register stage packages; all written
only once everything was computed. Metrics, protocol and grids also go to each candidate's
MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from gan.ema import NORM_STATISTICS_SAMPLES, refresh_statistics
from gan.export import save_generator, sha256_file
from gan.sampling import LatentSampler, generate, mix_seed
from pipeline.candidates import (
    GENERATORS,
    generator_from_checkpoint,
    list_candidates,
)
from pipeline.config import RANKING_METRICS, EvaluateParams, Params
from pipeline.data import PreparedSplit
from pipeline.errors import EvaluationError
from pipeline.featurenet import fit_classifier, load_featurenet, predict, read_featurenet_info
from pipeline.fidelity import (
    FEATURENET,
    INCEPTION,
    compute,
    generated_images,
    inception_weights,
    quantize,
    real_images,
)
from pipeline.files import check_output_dir, replace_entries, staging_dir, write_json
from pipeline.shards import verify_prepared
from pipeline.tracking import check_reachable, json_tag, tracking_uri

log = logging.getLogger(__name__)

ALL_METRICS = ("fid", "isc", "kid", "prc")
SAMPLES = "samples"
OUTPUTS = (SAMPLES, GENERATORS)  # what evaluate replaces in evaluate.out_dir, and only those
STAGE, OUT_DIR_KEY = "evaluate", "evaluate.out_dir"
GRID_IMAGES = 64
# A class counts as covered when it gets at least this share of the samples it would get if
# the generator matched the real class frequencies.
COVERAGE_SHARE = 0.5
GENERATOR_KINDS = ("ema", "raw")  # the two generators of every checkpoint
# The EMA and the raw generator are flagged when one is this much worse than the other on the
# choice metric (FID/KID ratio, or the inverse ratio of a higher-is-better figure).
GAP_RATIO = 1.25
GAP_TAG = "ganpipe.eval.generator_gap"


class Scorer:
    """Scores image sets against the real split with each available feature extractor;
    `config` is an EvaluateParams (sample counts, KID/PR settings, cache, seed)."""

    def __init__(self, config: EvaluateParams, extractors: dict, dataset_hash: str):
        self.config, self.extractors = config, extractors
        self.dataset_hash = dataset_hash

    def score(
        self, generated: torch.Tensor, real, real_name: str, metrics=ALL_METRICS, only=None
    ) -> dict[str, float]:
        """Metrics of `generated` (float, [-1, 1]) against `real`, suffixed by extractor;
        `real_name` names the real set in the feature cache."""
        c, scores = self.config, {}
        for key, extractor in self.extractors.items():
            if only and key not in only:
                continue
            cache = f"{self.dataset_hash[:16]}-{real_name}-{extractor['sha256'][:16]}"
            values = compute(
                generated_images(generated), real, extractor=extractor["name"],
                weights=extractor["weights"], metrics=metrics, real_cache_name=cache,
                cache_dir=c.cache_dir, seed=c.seed, batch_size=c.batch_size,
                kid_subset_size=c.kid_subset_size, kid_subsets=c.kid_subsets,
                prc_neighborhood=c.prc_neighborhood,
            )  # fmt: skip
            scores |= {f"{k}_{key}": v for k, v in values.items()}
        return scores


def evaluate(params: Params) -> dict:
    """Score every candidate; write the metrics file, grids and exported generators."""
    c = params.evaluate
    check_output_dir(c.out_dir, STAGE, OUT_DIR_KEY, names=OUTPUTS)  # before any work
    manifest = verify_prepared(params.prepare.out_dir, ["train", "test"])
    uri = tracking_uri(params)
    check_reachable(uri)
    net, net_info = _featurenet(params, manifest)
    candidates = list_candidates(params.train.out_dir)
    real_pixels, real_labels = PreparedSplit(params.prepare.out_dir, c.split, verify=False).read()
    test_pixels, test_labels = PreparedSplit(params.prepare.out_dir, "test", verify=False).read()
    extractors, inception = _extractors(params, net_info)
    protocol = _protocol(params, manifest, extractors, len(real_pixels), len(test_pixels))
    scorer = Scorer(c, extractors, manifest["dataset_hash"])
    real = real_images(real_pixels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    train = real if c.split == "train" else real_images(PreparedSplit(
        params.prepare.out_dir, "train", verify=False).read()[0])  # fmt: skip
    floor = scorer.score(_as_float(test_pixels), train, "train", ("fid", "isc"))
    sanity = {f"fid_floor_{k[4:]}": v for k, v in floor.items() if k.startswith("fid_")}
    sanity |= {f"is_real_{k[3:]}": v for k, v in floor.items() if k.startswith("is_")}
    timings["floor_s"] = _since(tick)

    staging = staging_dir(c.out_dir)
    try:
        results, ceilings = {}, {}
        for candidate in candidates:
            tick = time.perf_counter()
            scored = {}
            for which in GENERATOR_KINDS:
                generator, spec, run_params = generator_from_checkpoint(
                    candidate.checkpoint, manifest, which
                )
                ready = prepared_generator(generator.to(device), spec, c.seed)
                fake = _samples(ready, spec, c.num_samples, c)
                scores = scorer.score(fake, real, c.split)
                if net is not None:
                    scores |= class_figures(net, fake, spec.num_classes, real_labels)
                scored[which] = (ready, fake, scores)
            choice = choose_generator(
                {k: v[2] for k, v in scored.items()}, params.register.metric, c.generator
            )
            generator, fake, scores = scored[choice["generator"]]
            if spec not in ceilings:  # an untrained generator of this architecture
                ceilings[spec] = _ceiling(scorer, spec, real, device, c)
            scores = scores | ceilings[spec]
            if spec.num_classes and net is not None:
                scores |= _per_class_fid(scorer, generator, spec, real_pixels, real_labels, c)
                scores |= _cas(fake, spec.num_classes, test_pixels, test_labels, params, device)
            timings[f"candidate_s.{candidate.name}"] = _since(tick)
            if choice["gap_flagged"]:
                log.warning("candidate %s: %s", candidate.name, choice["gap"])
            results[candidate.name] = {
                "diverged": candidate.diverged,
                "steps": candidate.steps,
                "mlflow_run_id": candidate.mlflow_run_id,
                **scores,
                "generator": choice.pop("generator"),
                "generator_choice": choice,
                "by_generator": {k: v[2] for k, v in scored.items()},
            }
            chosen = results[candidate.name]["generator"]
            _export(staging, candidate, generator.cpu(), spec, run_params, manifest, c, chosen)
        report = {
            "protocol": protocol,
            "sanity": sanity,
            "candidates": results,
            "inception": inception,
            "featurenet": _domain_trust(net_info, sanity, ceilings),
            "timings": timings,
        }
        _log_to_runs(uri, report, staging)
        replace_entries(staging, Path(c.out_dir), STAGE, OUT_DIR_KEY)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(c.metrics_file, report)
    return report


def prepared_generator(generator: torch.nn.Module, spec, seed: int) -> torch.nn.Module:
    """The generator in eval mode with BatchNorm statistics of its own weights, recomputed on
    seed-fixed noise: the same treatment for the EMA and the raw generator."""
    sampler = LatentSampler(spec.z_dim, spec.num_classes)
    return refresh_statistics(generator, sampler, mix_seed(seed, NORM_STATISTICS_SAMPLES))


def choose_generator(scores: dict[str, dict], metric: str, rule: str) -> dict:
    """Which of a checkpoint's generators is the candidate (`rule`: best, ema or raw), how the
    two compare on `metric` and whether their gap is large (GAP_RATIO).

    `metric` is register.metric; when the two were not both scored on it (CAS is computed for
    the chosen generator only, Inception may be off), FID in featurenet features decides."""
    if not all(_finite(s.get(metric)) for s in scores.values()):
        metric = "fid_domain" if all("fid_domain" in s for s in scores.values()) else None
    if metric is None:
        gap = "no metric both generators were scored on"
        chosen = "ema" if rule == "best" else rule
        return {"generator": chosen, "rule": rule, "metric": None, "gap_flagged": False, "gap": gap}
    ema, raw = scores["ema"][metric], scores["raw"][metric]
    lower_is_better = RANKING_METRICS.get(metric, "min") == "min"
    ema_wins = ema <= raw if lower_is_better else ema >= raw
    best, worst = (ema, raw) if ema_wins else (raw, ema)
    numerator, denominator = (worst, best) if lower_is_better else (best, worst)
    ratio = numerator / denominator if denominator > 0 else math.inf
    gap_flagged = ratio > GAP_RATIO
    loser, winner = ("raw", "ema") if ema_wins else ("ema", "raw")
    gap = f"{loser} {metric} {worst:.4g} vs {winner} {best:.4g} ({ratio:.2f}x worse)"
    if gap_flagged:
        gap += f": above the {GAP_RATIO}x a healthy pair keeps; check the EMA and training"
    return {
        "generator": (winner if rule == "best" else rule),
        "rule": rule,
        "metric": metric,
        "ema": ema,
        "raw": raw,
        "gap_ratio": ratio,
        "gap_flagged": gap_flagged,
        "gap": gap,
    }


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _featurenet(params: Params, manifest: dict):
    """The featurenet and its description; (None, description) when the data is unlabeled."""
    info = read_featurenet_info(params.featurenet.out_dir)
    if info["dataset_hash"] != manifest["dataset_hash"]:
        raise EvaluationError(
            f"the featurenet in {params.featurenet.out_dir} was made for dataset "
            f"{info['dataset_hash'][:12]}, the prepared data is "
            f"{manifest['dataset_hash'][:12]}; re-run the featurenet stage (dvc repro)"
        )
    if not info["available"]:
        return None, info
    return load_featurenet(params.featurenet.out_dir)


# Below this ratio of an untrained generator's FID to the real-vs-real FID the featurenet's
# features hardly tell generated images from real ones.
MIN_SEPARATION = 10.0


def _domain_trust(net_info: dict, sanity: dict, ceilings: dict) -> dict:
    """How far the *_domain scores can be trusted: the featurenet's accuracy and skill above
    chance (its trust level, pipeline.featurenet.TRUST_LEVELS), and whether its features
    separate real from generated images (the untrained generator's FID over the floor)."""
    keys = ("available", "test_accuracy", "chance_accuracy", "test_skill", "domain_trust",
            "domain_trust_meaning", "reason")  # fmt: skip
    trust = {k: net_info[k] for k in keys if k in net_info}
    floor = sanity.get("fid_floor_domain")
    ceiling = [c["fid_ceiling_domain"] for c in ceilings.values() if "fid_ceiling_domain" in c]
    if floor and ceiling:
        separation = min(ceiling) / floor
        trust["separation"] = separation
        trust["separates_real_from_generated"] = separation >= MIN_SEPARATION
    return trust


def _extractors(params: Params, net_info: dict) -> tuple[dict, dict]:
    """The feature extractors to score with, and whether Inception is on (or why not)."""
    extractors = {}
    if net_info["available"]:
        extractors["domain"] = domain_extractor(params.featurenet.out_dir, net_info)
    inception = {"status": "off", "reason": "evaluate.inception is false"}
    if params.evaluate.inception:
        path, reason = inception_weights(params.evaluate.inception_weights)
        if path is None:
            inception = {"status": "skipped", "reason": reason}
        else:
            extractors["inception"] = {
                "name": INCEPTION,
                "weights": path,
                "sha256": sha256_file(path),
            }
            inception = {"status": "computed", "weights": path}
    if not extractors:
        raise EvaluationError(
            f"nothing to score with: there is no featurenet ({net_info['reason']}) and Inception "
            f"is {inception['status']} ({inception['reason']}); set evaluate.inception: true, "
            "with evaluate.inception_weights where there is no internet"
        )
    return extractors, inception


def domain_extractor(featurenet_dir: str | Path, info: dict) -> dict:
    """The featurenet as a Scorer extractor entry."""
    weights = str(Path(featurenet_dir).resolve())
    return {"name": FEATURENET, "weights": weights, "sha256": info["weights_sha256"]}


def _protocol(params: Params, manifest: dict, extractors: dict, real: int, test: int) -> dict:
    """Everything that makes two candidates' numbers comparable. `ids` has one hash per
    feature extractor (its metrics are comparable when it matches), `id` one for all."""
    c = params.evaluate
    common = {
        "dataset_hash": manifest["dataset_hash"],
        "split": c.split,
        "num_samples": c.num_samples,
        "real_samples": real,
        "floor_samples": test,
        "generator": c.generator,
        "norm_statistics_samples": NORM_STATISTICS_SAMPLES,
        "seed": c.seed,
        "kid_subset_size": c.kid_subset_size,
        "kid_subsets": c.kid_subsets,
        "prc_neighborhood": c.prc_neighborhood,
        "coverage_share": COVERAGE_SHARE,
        "torch_fidelity": torch_fidelity.__version__,
    }
    used = {k: {"name": v["name"], "sha256": v["sha256"]} for k, v in extractors.items()}
    ids = {k: _digest({**common, "feature_extractor": v}) for k, v in used.items()}
    protocol = {"feature_extractors": used, **common}
    return {"id": _digest(protocol), "ids": ids, **protocol}


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _as_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (exactly invertible by `quantize`)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _samples(generator, spec, n: int, config, label: int | None = None, seed=None):
    return generate(
        generator, n, spec.z_dim, spec.num_classes, config.seed if seed is None else seed,
        label=label, batch_size=config.batch_size,
    )  # fmt: skip


def _ceiling(scorer: Scorer, spec, real, device, config) -> dict[str, float]:
    """FID of a freshly initialised generator of this architecture (the sanity ceiling)."""
    torch.manual_seed(config.seed)
    untrained = spec.build().eval().to(device)
    fid = scorer.score(
        _samples(untrained, spec, config.num_samples, config), real, config.split, ("fid",)
    )
    return {f"fid_ceiling_{k[4:]}": v for k, v in fid.items()}


def class_figures(net, fake: torch.Tensor, num_classes: int, real_labels) -> dict:
    """Class coverage of the samples (featurenet predictions vs the real class frequencies);
    for conditional generators also how often a sample shows its conditioning class."""
    predicted = predict(net, _nhwc(fake))
    classes = net.classifier.out_features
    expected = np.bincount(real_labels, minlength=classes) / len(real_labels)
    got = np.bincount(predicted, minlength=classes) / len(predicted)
    figures = {"class_coverage_domain": float((got >= COVERAGE_SHARE * expected).mean())}
    if num_classes:
        conditioned = np.arange(len(fake)) % num_classes  # gan.sampling cycles the labels
        figures["label_accuracy_domain"] = float((predicted == conditioned).mean())
    return figures


def _per_class_fid(scorer, generator, spec, real_pixels, real_labels, config) -> dict:
    """FID of each class's conditioned samples against that class's real images (featurenet)."""
    per_class, n = {}, max(config.num_samples // spec.num_classes, 2)
    for label in range(spec.num_classes):
        real = real_pixels[real_labels == label]
        if len(real) < 2:
            continue
        fake = _samples(generator, spec, n, config, label, seed=mix_seed(config.seed, label))
        values = scorer.score(
            fake, real_images(real), f"{config.split}-class{label}", ("fid",), only=("domain",)
        )
        per_class[f"fid_class{label}_domain"] = values["fid_domain"]
    if not per_class:
        return {}
    return {"fid_class_mean_domain": float(np.mean(list(per_class.values()))), **per_class}


def _cas(fake, num_classes, test_pixels, test_labels, params: Params, device) -> dict:
    """Classification Accuracy Score: the featurenet recipe fitted on generated images only."""
    labels = np.arange(len(fake)) % num_classes
    net = fit_classifier(_nhwc(fake), labels, num_classes, params.featurenet, device)
    return {"cas_accuracy": float((predict(net, test_pixels) == test_labels).mean())}


def _nhwc(fake: torch.Tensor) -> np.ndarray:
    return quantize(fake).permute(0, 2, 3, 1).contiguous().numpy()


def _export(
    staging: Path, candidate, generator, spec, run_params, manifest, config, which: str
) -> None:
    """The candidate's sample grid and its generator, as the register stage packages it."""
    from torchvision.utils import save_image

    grid = _samples(generator, spec, GRID_IMAGES, config)
    (staging / SAMPLES).mkdir(exist_ok=True)
    save_image(grid.add(1).div(2), staging / SAMPLES / f"{candidate.name}.png", nrow=8)
    save_generator(
        staging / GENERATORS / candidate.name, generator, spec, candidate=candidate.name,
        mlflow_run_id=candidate.mlflow_run_id, dataset_hash=manifest["dataset_hash"],
        class_names=manifest.get("class_names", []), which=which,
        steps=candidate.steps, params=run_params,
    )  # fmt: skip


def _log_to_runs(uri: str, report: dict, out_dir: Path) -> None:
    """Each candidate's metrics, the protocol and its grid (from `out_dir`), into its MLflow
    training run."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(uri), int(time.time() * 1000)
    for name, result in report["candidates"].items():
        run_id = result["mlflow_run_id"]
        if not run_id:
            continue
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s of %s is not in %s: not logged", run_id, name, uri)
            continue
        values = {k: v for k, v in result.items() if isinstance(v, float)}
        values |= {f"sanity.{k}": v for k, v in report["sanity"].items()}
        for which, scores in result["by_generator"].items():
            values |= {f"{which}.{k}": v for k, v in scores.items() if isinstance(v, float)}
        client.log_batch(
            run_id,
            metrics=[Metric(f"eval.{k}", v, now, result["steps"]) for k, v in values.items()],
        )
        choice = result["generator_choice"]
        client.set_tag(run_id, "ganpipe.eval.generator", result["generator"])
        flagged = "FLAGGED: " if choice["gap_flagged"] else ""
        client.set_tag(run_id, GAP_TAG, flagged + choice["gap"])
        client.set_tag(run_id, "ganpipe.eval.protocol_id", report["protocol"]["id"])
        client.set_tag(run_id, "ganpipe.eval.protocol", json_tag(report["protocol"]))
        client.log_artifact(run_id, str(out_dir / SAMPLES / f"{name}.png"), "evaluate")


def _since(tick: float) -> float:
    return round(time.perf_counter() - tick, 3)


class TrialEvaluator:
    """The sweep's intermediate score, on rank 0 inside the training loop: FID and KID of
    `sweep.eval_samples` EMA-generator images in featurenet features (real features from the
    cache the sweep driver filled), and the class coverage of those images."""

    KID_SUBSETS = 10  # a tenth of the final evaluation's: the trend matters, not the digits

    def __init__(self, settings: dict):
        self.samples = settings["eval_samples"]
        pixels, self.labels = PreparedSplit(settings["prepared"], "train", verify=False).read()
        self.real = real_images(pixels)
        self.config = EvaluateParams(
            num_samples=self.samples, kid_subset_size=min(self.samples, len(pixels), 1000),
            kid_subsets=self.KID_SUBSETS, seed=settings["seed"], cache_dir=settings["cache_dir"],
        )  # fmt: skip
        self.net, info = load_featurenet(settings["featurenet"])
        extractors = {"domain": domain_extractor(settings["featurenet"], info)}
        self.scorer = Scorer(self.config, extractors, settings["dataset_hash"])

    def __call__(self, generator, spec) -> dict[str, float]:
        tick = time.perf_counter()
        fake = _samples(generator, spec, self.samples, self.config)
        scores = self.scorer.score(fake, self.real, "train", ("fid", "kid"))
        scores |= class_figures(self.net, fake, spec.num_classes, self.labels)
        return {**scores, "eval_seconds": time.perf_counter() - tick}
