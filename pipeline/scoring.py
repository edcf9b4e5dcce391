"""Scoring generated images: the figures the evaluate stage reports and the sweep's trial score.

`Scorer` computes FID / IS / KID / precision-recall of a set of images against a real split,
with each feature extractor (the featurenet, Inception-v3), through pipeline.fidelity.
`TrialEvaluator` is the sweep's intermediate score inside the training loop; it lives here, not
in the evaluate stage, so that the train stage runs (and depends on) only the code it needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from gan.sampling import generate
from pipeline.config import EvaluateParams
from pipeline.data import PreparedSplit, to_nhwc
from pipeline.featurenet import load_featurenet, predict
from pipeline.fidelity import FEATURENET, compute, generated_images, real_images

ALL_METRICS = ("fid", "isc", "kid", "prc")
# A class counts as covered when it gets at least this share of the samples it would get if
# the generator matched the real class frequencies.
COVERAGE_SHARE = 0.5


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


def domain_extractor(featurenet_dir: str | Path, info: dict) -> dict:
    """The featurenet as a Scorer extractor entry."""
    weights = str(Path(featurenet_dir).resolve())
    return {"name": FEATURENET, "weights": weights, "sha256": info["weights_sha256"]}


def sample_images(generator, spec, n: int, config, label: int | None = None, seed=None):
    return generate(
        generator, n, spec.z_dim, spec.num_classes, config.seed if seed is None else seed,
        label=label, batch_size=config.batch_size,
    )  # fmt: skip


def class_figures(net, fake: torch.Tensor, num_classes: int, real_labels) -> dict:
    """Class coverage of the samples (featurenet predictions vs the real class frequencies);
    for conditional generators also how often a sample shows its conditioning class."""
    predicted = predict(net, to_nhwc(fake))
    classes = net.classifier.out_features
    expected = np.bincount(real_labels, minlength=classes) / len(real_labels)
    got = np.bincount(predicted, minlength=classes) / len(predicted)
    figures = {"class_coverage_domain": float((got >= COVERAGE_SHARE * expected).mean())}
    if num_classes:  # the class-conditional task's label_accuracy
        conditioned = np.arange(len(fake)) % num_classes  # gan.sampling cycles the labels
        figures["label_accuracy_domain"] = float((predicted == conditioned).mean())
    return figures


class TrialEvaluator:
    """The sweep's intermediate score, on rank 0 inside the training loop: FID and KID of
    `sweep.eval_samples` EMA-generator images in featurenet features (real features from the
    cache the sweep driver filled), and the class coverage of those images."""

    KID_SUBSETS = 10  # a tenth of the final evaluation's: the trend matters, not the digits

    def __init__(self, settings):
        """`settings`: the trial's pipeline.training.worker_config.TrialScoring."""
        self.samples = settings.eval_samples
        pixels, self.labels = PreparedSplit(settings.prepared, "train", verify=False).read()
        self.real = real_images(pixels)
        self.config = EvaluateParams(
            num_samples=self.samples, kid_subset_size=min(self.samples, len(pixels), 1000),
            kid_subsets=self.KID_SUBSETS, seed=settings.seed, cache_dir=settings.cache_dir,
        )  # fmt: skip
        self.net, info = load_featurenet(settings.featurenet)
        extractors = {"domain": domain_extractor(settings.featurenet, info)}
        self.scorer = Scorer(self.config, extractors, settings.dataset_hash)

    def __call__(self, generator, spec) -> dict[str, float]:
        tick = time.perf_counter()
        fake = sample_images(generator, spec, self.samples, self.config)
        scores = self.scorer.score(fake, self.real, "train", ("fid", "kid"))
        scores |= class_figures(self.net, fake, spec.num_classes, self.labels)
        return {**scores, "eval_seconds": time.perf_counter() - tick}

    def fill_real_cache(self) -> None:
        """Compute the real train split's features once, before trials read them (and fail
        now, not in every trial, without a featurenet)."""
        some = self.real.images[:16].float().div(127.5).sub(1)  # any images will do
        self.scorer.score(some, self.real, "train", ("fid",))
