"""The `featurenet` stage: a classifier of the real data, the offline feature extractor.

Inception-v3 features need downloaded weights and a GPU; a small CNN trained on the prepared
train split needs neither, and knows the domain (digits are not ImageNet). Its penultimate
activations serve FID / KID / precision-recall and its logits the Inception Score, the way
Inception's pool3 and logits do (metrics named `*_domain`, never mixed with Inception's). The
same training routine gives the Classification Accuracy Score (Ravuri & Vinyals 2019, "CAS"):
a classifier fitted on generated images and tested on real ones.

Files: `featurenet.safetensors` and `featurenet.json` (architecture, class names, accuracy,
dataset version, weights sha256) in `featurenet.out_dir`, replaced atomically, and only if that
directory is absent, empty or the featurenet stage's own (pipeline.files): checked before
training, so a refused output path costs nothing.

How good must it be? FID needs features that describe the data, not a perfect classifier: a
small CNN trained for a minute on CPU reaches 0.99 on digits but about 0.65 on CIFAR-10, and
its features still rank generators by how real their images look (the evaluate stage checks
that they separate real from generated: the FID floor against an untrained generator's
ceiling). So the floor is relative to chance: the held-out *skill*, (accuracy - chance) /
(1 - chance) with chance the majority class's share, must reach `featurenet.min_skill`
(0.5 by default: 0.55 for ten balanced classes), or the stage fails and writes nothing. The
skill is reported with a trust level for the `*_domain` scores (TRUST_LEVELS), which the
evaluate stage carries into its metrics.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gan.export import sha256_file
from pipeline.artifacts import read_stage_json
from pipeline.config import FeaturenetParams, Params
from pipeline.data import PreparedSplit, to_float
from pipeline.errors import EvaluationError
from pipeline.files import (
    check_output_dir,
    replace_dir,
    staging_dir,
    write_json,
)
from pipeline.metrics_files import featurenet_metrics

FORMAT = "ganpipe.featurenet.v2"  # v2: one convolution at full resolution (v1 had two)
EARLIER_FORMATS = ("ganpipe.featurenet.v1",)  # outputs of ours that a re-run may replace
WEIGHTS, INFO = "featurenet.safetensors", "featurenet.json"
STAGE, OUT_DIR_KEY = "featurenet", "featurenet.out_dir"
# (lowest skill, level, what it means for the *_domain scores), best first.
TRUST_LEVELS = (
    (0.9, "high", "the classes are well separated in these features: domain FID/IS/KID, "
                  "precision/recall and class coverage are all meaningful"),
    (0.5, "moderate", "the features describe the data but classes overlap: FID/KID and "
                      "precision/recall rank generators; IS and class coverage are rough"),
    (0.0, "low", "the features separate the classes poorly: compare generators by FID/KID "
                 "only, and check them against Inception (evaluate.inception) where possible"),
)  # fmt: skip


def skill(accuracy: float, labels: np.ndarray) -> tuple[float, float]:
    """(chance accuracy: the majority class's share of `labels`, skill above chance)."""
    chance = float(np.bincount(labels).max() / len(labels))
    return chance, (accuracy - chance) / (1 - chance) if chance < 1 else 0.0


def trust(skill_value: float) -> tuple[str, str]:
    """The trust level of domain scores computed with a featurenet of this skill."""
    for lowest, level, meaning in TRUST_LEVELS:
        if skill_value >= lowest:
            return level, meaning
    return TRUST_LEVELS[-1][1:]


class FeatureNet(nn.Module):
    """A VGG-style CNN: a conv and a block of two, each followed by pooling, a fourth conv,
    global average pooling, a `feature_dim` embedding (the FID features) and a linear
    classifier (the IS logits). One conv at full resolution, not two (v1): measured on 8,000
    CIFAR-10 images at 32 px, 2 CPUs, 10 epochs: 108 s for test accuracy 0.629, where two took
    128-147 s for 0.625-0.656."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.body = nn.Sequential(
            *conv(channels, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (N, C, H, W) -> (features, logits)."""
        features = self.body(x)
        return features, self.classifier(features)


def _batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return order.split(batch_size)


def fit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: FeaturenetParams,
    device,
    progress: Callable[[str], None] | None = None,
    steps: int | None = None,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> FeatureNet:
    """Train a FeatureNet on uint8 NHWC images (Adam, cosine decay, random 1-pixel shifts);
    `progress` gets one line per epoch (loss, accuracy on the epoch's batches, time).

    `steps` fixes the number of optimiser steps (default: `config.epochs` passes), so that
    training sets of different sizes get the same compute; `transform` (batch in [-1, 1],
    the shuffling generator) augments each batch after the shifts."""
    torch.manual_seed(config.seed)
    net = FeatureNet(images.shape[-1], num_classes, config.width, config.feature_dim).to(device)
    optimizer = torch.optim.Adam(net.parameters(), config.lr)
    per_epoch = math.ceil(len(images) / config.batch_size)
    steps = steps or config.epochs * per_epoch
    epochs = math.ceil(steps / per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    pixels, targets = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
    shuffle = torch.Generator().manual_seed(config.seed)
    net.train()
    start, done = time.perf_counter(), 0
    for epoch in range(epochs):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for index in _batches(len(pixels), config.batch_size, shuffle)[: steps - done]:
            x = to_float(pixels[index], device)
            dx, dy = torch.randint(-1, 2, (2,), generator=shuffle).tolist()
            x = torch.roll(x, (dx, dy), dims=(2, 3))
            if transform is not None:
                x = transform(x, shuffle)
            y = targets[index].to(device)
            logits = net(x)[1]
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * len(index)
            correct += (logits.detach().argmax(1) == y).sum()
            seen, done = seen + len(index), done + 1
        if progress is not None:  # one host sync per epoch
            progress(
                f"epoch {epoch + 1}/{epochs}: loss {loss_sum.item() / seen:.4f}, "
                f"train accuracy {correct.item() / seen:.4f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    return net.eval()


def _print_progress(line: str) -> None:
    print(f"featurenet {line}", file=sys.stderr, flush=True)


@torch.no_grad()
def predict(net: FeatureNet, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted classes of uint8 NHWC images."""
    device = next(net.parameters()).device
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    out = [
        net(to_float(pixels[i], device))[1].argmax(1).cpu()
        for i in _batches(len(pixels), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.int64)


def accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(net, images) == labels).mean())


def train_featurenet(params: Params) -> dict:
    """Train on the train split, test on the test split, save if accurate enough.

    Unlabeled data has no classifier: the stage then records that there is none (and why),
    and evaluation scores with Inception only."""
    config = params.featurenet
    check_output_dir(config.out_dir, STAGE, OUT_DIR_KEY, recognise=_own_entries)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = PreparedSplit(params.prepare.out_dir, "train")
    test = PreparedSplit(params.prepare.out_dir, "test")
    images, labels = train.read()
    test_images, test_labels = test.read()
    if len(train.class_names) < 2 or (labels < 0).any() or (test_labels < 0).any():
        reason = (
            f"the prepared data in {params.prepare.out_dir} is unlabeled, and the featurenet is "
            "a classifier; *_domain metrics need labeled data (imagefolder with image_labels: "
            "folders), otherwise evaluation uses Inception (evaluate.inception: true)"
        )
        info = {"format": FORMAT, "available": False, "reason": reason}
        _save(Path(config.out_dir), None, info | {"dataset_hash": train.dataset_hash})
        write_json(config.metrics_file, featurenet_metrics({}))
        return {"available": False, "reason": reason}
    num_classes = len(train.class_names)
    _print_progress(
        f"training on {len(images)} images ({num_classes} classes, {config.epochs} epochs)"
    )
    start = time.perf_counter()
    net = fit_classifier(images, labels, num_classes, config, device, _print_progress)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(net, test_images, test_labels)
    chance, test_skill = skill(test_accuracy, test_labels)
    level, meaning = trust(test_skill)
    report = {
        "available": True,
        "test_accuracy": test_accuracy,
        "train_accuracy": accuracy(net, images, labels),
        "chance_accuracy": chance,
        "test_skill": test_skill,
        "domain_trust": level,
        "domain_trust_meaning": meaning,
        "train_seconds": round(seconds, 2),
        "num_classes": num_classes,
        "train_images": len(images),
        "test_images": len(test_images),
    }
    _print_progress(
        f"test accuracy {test_accuracy:.4f} (chance {chance:.3f}, skill {test_skill:.3f}): "
        f"domain scores' trust {level}"
    )
    hint = "train longer (featurenet.epochs) or wider (featurenet.width)"
    if config.min_skill > 0 and test_skill < config.min_skill:
        raise EvaluationError(
            f"featurenet reached test accuracy {test_accuracy:.4f} (chance {chance:.3f}): skill "
            f"{test_skill:.3f} is below featurenet.min_skill {config.min_skill}, so its "
            f"features barely know the classes and would make FID meaningless; {hint}"
        )
    if test_accuracy < config.min_accuracy:
        raise EvaluationError(
            f"featurenet reached test accuracy {test_accuracy:.4f}, below "
            f"featurenet.min_accuracy {config.min_accuracy}; {hint}, or lower min_accuracy "
            "(featurenet.min_skill is the floor relative to chance)"
        )
    info = {
        "format": FORMAT,
        "channels": train.shape[2],
        "resolution": train.shape[0],
        "num_classes": num_classes,
        "width": config.width,
        "feature_dim": config.feature_dim,
        "class_names": train.class_names,
        "dataset_hash": train.dataset_hash,
        **report,
    }
    _save(Path(config.out_dir), net, info)
    write_json(config.metrics_file, featurenet_metrics(report))
    return report


def _save(out_dir: Path, net: FeatureNet | None, info: dict) -> None:
    """Weights (if any) and description into a staging directory, then swapped in."""
    staging = staging_dir(out_dir)
    try:
        if net is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, staging / WEIGHTS, metadata={"format": FORMAT})
            info["weights_sha256"] = sha256_file(staging / WEIGHTS)
        (staging / INFO).write_text(json.dumps(info, indent=1) + "\n")
        replace_dir(staging, out_dir, STAGE, OUT_DIR_KEY, recognise=_own_entries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _own_entries(out_dir: Path) -> list[str]:
    """What this stage wrote in `out_dir` before pipeline.files' markers: its two files, when
    featurenet.json says so."""
    try:
        ours = json.loads((Path(out_dir) / INFO).read_text()).get("format") in (
            FORMAT,
            *EARLIER_FORMATS,
        )
    except (OSError, ValueError, AttributeError):
        ours = False
    return [INFO, WEIGHTS] if ours else []


def read_featurenet_info(directory: str | Path) -> dict:
    """The featurenet stage's description: `available` False (with a reason) for unlabeled
    data, else the architecture, accuracy, dataset version and weights sha256."""
    path = Path(directory) / INFO
    info = read_stage_json(path, STAGE, EvaluationError)
    if info.get("format") != FORMAT or "available" not in info:
        raise EvaluationError(
            f"{path}: not written by this version's featurenet stage (format "
            f"{info.get('format')!r}); re-run it (dvc repro featurenet)"
        )
    return info


def load_featurenet(directory: str | Path) -> tuple[FeatureNet, dict]:
    """The trained featurenet (eval mode, CPU) and its description; checked by sha256."""
    directory = Path(directory)
    info = read_featurenet_info(directory)
    if not info["available"]:
        raise EvaluationError(f"there is no featurenet in {directory}: {info['reason']}")
    weights = directory / WEIGHTS
    if not weights.is_file() or sha256_file(weights) != info["weights_sha256"]:
        raise EvaluationError(
            f"{weights} is missing or does not match its sha256 in {INFO}; re-run the featurenet "
            "stage"
        )
    net = FeatureNet(info["channels"], info["num_classes"], info["width"], info["feature_dim"])
    net.load_state_dict(load_file(weights))
    return net.eval().requires_grad_(False), info
