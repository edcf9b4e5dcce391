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

Outputs: in `evaluate.out_dir` report.json (every figure, the protocol, the generator choice,
the sanity figures), a sample grid per candidate (DVC plots) and the exported generator the
register stage packages; in `evaluate.metrics_dir` the DVC metrics (pipeline.metrics_files:
c1.json ... per candidate, real.json); all written only once everything was computed.
Metrics, protocol and grids also go to each candidate's MLflow run.
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
from gan.sampling import LatentSampler, mix_seed
from pipeline.artifacts import (
    EVALUATE_METRICS_DIR_KEY,
    EVALUATE_OUT_DIR_KEY,
    EVALUATE_OUTPUTS,
    EVALUATE_REPORT,
    EVALUATE_SAMPLES,
    EVALUATE_STAGE,
    GENERATORS,
    is_score,
    list_candidates,
)
from pipeline.candidates import generator_from_checkpoint
from pipeline.config import RANKING_METRICS, Params
from pipeline.console import say
from pipeline.data import PreparedSplit, to_nhwc
from pipeline.errors import EvaluationError
from pipeline.featurenet import fit_classifier, load_featurenet, predict, read_featurenet_info
from pipeline.fidelity import INCEPTION, inception_weights, real_images
from pipeline.files import check_output_dir, replace_entries, staging_dir, write_json
from pipeline.metrics_files import check_metrics_dir, evaluation_metrics, write_metrics_dir
from pipeline.scoring import (
    COVERAGE_SHARE,
    Scorer,
    class_figures,
    domain_extractor,
    sample_images,
)
from pipeline.shards import verify_prepared
from pipeline.tracking import candidate_runs, check_reachable, json_tag, tracking_uri

log = logging.getLogger(__name__)

GRID_IMAGES = 64
GENERATOR_KINDS = ("ema", "raw")  # the two generators of every checkpoint
# The EMA and the raw generator are flagged when one is this much worse than the other on the
# choice metric (FID/KID ratio, or the inverse ratio of a higher-is-better figure).
GAP_RATIO = 1.25
GAP_TAG = "ganpipe.eval.generator_gap"


def evaluate(params: Params) -> dict:
    """Score every candidate; write the report, metrics, grids and exported generators."""
    c = params.evaluate
    check_output_dir(
        c.out_dir, EVALUATE_STAGE, EVALUATE_OUT_DIR_KEY, names=EVALUATE_OUTPUTS
    )  # before any work
    check_metrics_dir(c.metrics_dir, EVALUATE_STAGE, EVALUATE_METRICS_DIR_KEY)
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
    say("evaluate", f"floor (real test against train): {_figures(sanity)} ({timings['floor_s']} s)")

    staging = staging_dir(c.out_dir)
    try:
        results, ceilings = {}, {}
        for number, candidate in enumerate(candidates, 1):
            tick = time.perf_counter()
            about = f"candidate {number}/{len(candidates)} {candidate.name}"
            scored = {}
            for which in GENERATOR_KINDS:
                generator, spec, run_params = generator_from_checkpoint(
                    candidate.checkpoint, manifest, which
                )
                ready = prepared_generator(generator.to(device), spec, c.seed)
                fake = sample_images(ready, spec, c.num_samples, c)
                scores = scorer.score(fake, real, c.split)
                if net is not None:
                    scores |= class_figures(net, fake, spec.num_classes, real_labels)
                scored[which] = (ready, fake, scores)
                say("evaluate", f"{about}, {which} generator: {_figures(scores)}")
            choice = choose_generator(
                {k: v[2] for k, v in scored.items()}, params.register.metric, c.generator
            )
            generator, fake, scores = scored[choice["generator"]]
            if spec not in ceilings:  # an untrained generator of this architecture
                ceilings[spec] = _ceiling(scorer, spec, real, device, c)
            scores = scores | ceilings[spec]
            figures = spec.task_entry.metrics  # what applies to the task (gan.tasks)
            if "per_class_fid" in figures and net is not None:
                scores |= _per_class_fid(scorer, generator, spec, real_pixels, real_labels, c)
            if "cas" in figures and net is not None:
                scores |= _cas(fake, spec.num_classes, test_pixels, test_labels, params, device)
            timings[f"candidate_s.{candidate.name}"] = _since(tick)
            say("evaluate", f"{about}: {choice['generator']} chosen ({_since(tick)} s)")
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
        write_json(staging / EVALUATE_REPORT, report)
        replace_entries(staging, Path(c.out_dir), EVALUATE_STAGE, EVALUATE_OUT_DIR_KEY)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_metrics_dir(
        c.metrics_dir, evaluation_metrics(report), EVALUATE_STAGE, EVALUATE_METRICS_DIR_KEY
    )
    return report


def _figures(scores: dict) -> str:
    """The headline figures of a score dict, for a progress line."""
    keys = ("fid_floor_domain", "fid_domain", "kid_domain", "fid_inception", "isc_inception")
    return ", ".join(f"{k} {scores[k]:.4g}" for k in keys if is_score(scores.get(k))) or "scored"


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
    if not all(is_score(s.get(metric)) for s in scores.values()):
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


def _ceiling(scorer: Scorer, spec, real, device, config) -> dict[str, float]:
    """FID of a freshly initialised generator of this architecture (the sanity ceiling)."""
    torch.manual_seed(config.seed)
    untrained = spec.build().eval().to(device)
    fid = scorer.score(
        sample_images(untrained, spec, config.num_samples, config), real, config.split, ("fid",)
    )
    return {f"fid_ceiling_{k[4:]}": v for k, v in fid.items()}


def _per_class_fid(scorer, generator, spec, real_pixels, real_labels, config) -> dict:
    """FID of each class's conditioned samples against that class's real images (featurenet)."""
    per_class, n = {}, max(config.num_samples // spec.num_classes, 2)
    for label in range(spec.num_classes):
        real = real_pixels[real_labels == label]
        if len(real) < 2:
            continue
        fake = sample_images(generator, spec, n, config, label, seed=mix_seed(config.seed, label))
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
    net = fit_classifier(to_nhwc(fake), labels, num_classes, params.featurenet, device)
    return {"cas_accuracy": float((predict(net, test_pixels) == test_labels).mean())}


def _export(
    staging: Path, candidate, generator, spec, run_params, manifest, config, which: str
) -> None:
    """The candidate's sample grid and its generator, as the register stage packages it."""
    from torchvision.utils import save_image

    grid = sample_images(generator, spec, GRID_IMAGES, config)
    (staging / EVALUATE_SAMPLES).mkdir(exist_ok=True)
    save_image(grid.add(1).div(2), staging / EVALUATE_SAMPLES / f"{candidate.name}.png", nrow=8)
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
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(uri), int(time.time() * 1000)
    for name, result, run_id in candidate_runs(client, report["candidates"]):
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
        client.log_artifact(run_id, str(out_dir / EVALUATE_SAMPLES / f"{name}.png"), "evaluate")


def _since(tick: float) -> float:
    return round(time.perf_counter() - tick, 3)
