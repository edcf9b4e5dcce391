"""The `featurenet` stage: a classifier of the real data, the offline feature extractor.

Inception-v3 features need downloaded weights and a GPU; a small CNN trained on the prepared
train split needs neither, and knows the domain (digits are not ImageNet). Its penultimate
activations serve FID / KID / precision-recall and its logits the Inception Score, the way
Inception's pool3 and logits do (metrics named `*_domain`, never mixed with Inception's). The
same training routine gives the Classification Accuracy Score (Ravuri & Vinyals 2019, "CAS"):
a classifier fitted on generated images and tested on real ones.

Files: `featurenet.safetensors` and `featurenet.json` (architecture, class names, accuracy,
dataset version, weights sha256) in `featurenet.out_dir`, replaced atomically; the held-out
accuracy must reach `featurenet.min_accuracy`, or the stage fails and writes nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gan.export import sha256_file
from pipeline.config import FeaturenetParams, Params
from pipeline.data import PreparedSplit, to_float
from pipeline.errors import EvaluationError
from pipeline.files import replace_dir, staging_dir, write_json

FORMAT = "ganpipe.featurenet.v1"
WEIGHTS, INFO = "featurenet.safetensors", "featurenet.json"


class FeatureNet(nn.Module):
    """A VGG-style CNN: two conv blocks with pooling, a third conv, global average pooling,
    a `feature_dim` embedding (the FID features) and a linear classifier (the IS logits)."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.body = nn.Sequential(
            *conv(channels, w), *conv(w, w), nn.MaxPool2d(2),
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
    images: np.ndarray, labels: np.ndarray, num_classes: int, config: FeaturenetParams, device
) -> FeatureNet:
    """Train a FeatureNet on uint8 NHWC images (Adam, cosine decay, random 1-pixel shifts)."""
    torch.manual_seed(config.seed)
    net = FeatureNet(images.shape[-1], num_classes, config.width, config.feature_dim).to(device)
    optimizer = torch.optim.Adam(net.parameters(), config.lr)
    steps = config.epochs * math.ceil(len(images) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    pixels, targets = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
    shuffle = torch.Generator().manual_seed(config.seed)
    net.train()
    for _ in range(config.epochs):
        for index in _batches(len(pixels), config.batch_size, shuffle):
            x = to_float(pixels[index], device)
            dx, dy = torch.randint(-1, 2, (2,), generator=shuffle).tolist()
            x = torch.roll(x, (dx, dy), dims=(2, 3))
            loss = F.cross_entropy(net(x)[1], targets[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


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
        write_json(config.metrics_file, {"available": False})
        return {"available": False, "reason": reason}
    num_classes = len(train.class_names)
    start = time.perf_counter()
    net = fit_classifier(images, labels, num_classes, config, device)
    seconds = time.perf_counter() - start
    report = {
        "available": True,
        "test_accuracy": accuracy(net, test_images, test_labels),
        "train_accuracy": accuracy(net, images, labels),
        "train_seconds": round(seconds, 2),
        "num_classes": num_classes,
        "train_images": len(images),
        "test_images": len(test_images),
    }
    if report["test_accuracy"] < config.min_accuracy:
        raise EvaluationError(
            f"featurenet reached test accuracy {report['test_accuracy']:.4f}, below "
            f"featurenet.min_accuracy {config.min_accuracy}: its features would make FID "
            "meaningless; train longer (featurenet.epochs) or wider (featurenet.width)"
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
    write_json(config.metrics_file, report)
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
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_featurenet_info(directory: str | Path) -> dict:
    """The featurenet stage's description: `available` False (with a reason) for unlabeled
    data, else the architecture, accuracy, dataset version and weights sha256."""
    path = Path(directory) / INFO
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise EvaluationError(
            f"no usable featurenet in {directory} ({exc}); run the featurenet stage "
            "(dvc repro featurenet)"
        ) from None
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
