"""Drawing labeled images from a generator: seeded noise to uint8 images, and a classifier's
confident predictions as labels (pseudo-labels). Shared by `ganpipe synthesize` and the augment
stage, which need nothing else of each other."""

from __future__ import annotations

import numpy as np
import torch

from gan.models import GeneratorSpec
from gan.sampling import generate_from, truncate
from pipeline.data import to_float, to_nhwc


def draw(
    generator: torch.nn.Module,
    spec: GeneratorSpec,
    n: int,
    seed: int,
    labels: np.ndarray | None = None,
    truncation: float = 1.0,
    batch_size: int = 256,
) -> np.ndarray:
    """`n` images (uint8 NHWC) from noise seeded by `seed` (and `labels`, for a conditional
    generator), truncated by psi `truncation`."""
    z = torch.randn(n, spec.z_dim, generator=torch.Generator().manual_seed(seed))
    conditions = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return to_nhwc(generate_from(generator, truncate(z, truncation), conditions, batch_size))


@torch.no_grad()
def classify(net: torch.nn.Module, images: np.ndarray, batch_size: int = 512):
    """(predicted class, its softmax probability) of uint8 NHWC images, by a FeatureNet."""
    device = next(net.parameters()).device
    classes, confidence = [], []
    for start in range(0, len(images), batch_size):
        logits = net(to_float(images[start : start + batch_size], device))[1]
        best = logits.float().softmax(1).max(1)
        classes.append(best.indices.cpu())
        confidence.append(best.values.cpu())
    if not classes:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return torch.cat(classes).numpy(), torch.cat(confidence).numpy()


def pseudo_labels(net, images: np.ndarray, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(the rows kept, their labels): predictions of `net` at least `min_confidence` sure."""
    classes, confidence = classify(net, images)
    kept = np.flatnonzero(confidence >= min_confidence)
    return kept, classes[kept]


def class_counts(num_images: int, weights: list[float]) -> np.ndarray:
    """`num_images` shared out in proportion to `weights` (largest remainder, ties to the
    lower class): the counts sum to `num_images` exactly."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights) * num_images
    counts = np.floor(share).astype(np.int64)
    left = num_images - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:left]] += 1
    return counts
