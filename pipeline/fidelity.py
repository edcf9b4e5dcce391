"""torch-fidelity glue: the featurenet as a registered feature extractor, image datasets in the
form the library expects, Inception weights, and one call that computes a set of metrics.

The featurenet is registered through `torch_fidelity.register_feature_extractor` (the
library's extension point) under FEATURENET; it reads its weights from the directory passed
as `feature_extractor_weights_path`, as Inception reads its file. Real-image features are
cached by torch-fidelity under names that hold the dataset version, split and the extractor's
weights hash, so they are computed once and never reused for other data or weights.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from pipeline.errors import EvaluationError

log = logging.getLogger(__name__)

FEATURENET = "ganpipe-featurenet"
INCEPTION = "inception-v3-compat"
DOWNLOAD_PROBE_TIMEOUT_S = 10
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# Our metric names for torch-fidelity's result keys.
METRIC_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "is",
    torch_fidelity.KEY_METRIC_ISC_STD: "is_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


class FeaturenetExtractor(FeatureExtractorBase):
    """The domain classifier for torch-fidelity: uint8 RGB in, (features, logits) out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        from pipeline.featurenet import load_featurenet

        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise EvaluationError(f"{FEATURENET} needs feature_extractor_weights_path")
        self.net, info = load_featurenet(feature_extractor_weights_path)
        self.channels, self.resolution = info["channels"], info["resolution"]

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.float().div(127.5).sub(1.0)
        if self.channels == 1:  # gray images arrive replicated to RGB
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        features, logits = self.net(x)
        provided = {"features": features, "logits": logits}
        return tuple(provided[name] for name in self.features_list)


if FEATURENET not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FEATURENET, FeaturenetExtractor)


class WeightsOnlyInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3, unchanged except that its weights file is read with
    `weights_only` (the library unpickles it in full, which would run code in a file swapped
    in after our check). It replaces the library's entry under the same name."""

    def __init__(self, name, features_list, **kwargs):
        previous = os.environ.get(FORCE_WEIGHTS_ONLY)
        os.environ[FORCE_WEIGHTS_ONLY] = "1"  # torch.load honours it over weights_only=False
        try:
            super().__init__(name, features_list, **kwargs)
        finally:
            if previous is None:
                os.environ.pop(FORCE_WEIGHTS_ONLY, None)
            else:
                os.environ[FORCE_WEIGHTS_ONLY] = previous


torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[INCEPTION] = WeightsOnlyInceptionV3


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W), one tensor per item: what torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def real_images(images: np.ndarray) -> ImageDataset:
    """Prepared uint8 NHWC pixels as RGB NCHW (gray replicated)."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return ImageDataset(pixels.expand(-1, 3, -1, -1).contiguous())


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Generated float images in [-1, 1] (N, C, H, W) as uint8, the way a PNG stores them."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def generated_images(images: torch.Tensor) -> ImageDataset:
    pixels = quantize(images)
    return ImageDataset(pixels.expand(-1, 3, -1, -1).contiguous())


def inception_weights(configured: str | None) -> tuple[str | None, str | None]:
    """(path to Inception weights, None) or (None, why Inception metrics are skipped).

    A configured path must exist and hold a plain state dict of the right shapes (checked with
    `weights_only` loading, so it cannot run code), else EvaluationError. Without one, the
    file torch-fidelity downloads into torch's hub cache is used if present, or downloaded if
    GitHub answers; otherwise the reason is returned."""
    if configured:
        check_inception_weights(configured)
        return configured, None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
    if not cached.is_file():
        try:
            probe = urllib.request.Request(URL_INCEPTION_V3, method="HEAD")
            urllib.request.urlopen(probe, timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
            cached.parent.mkdir(parents=True, exist_ok=True)
            # The file name carries the first hex digits of its sha256: torch checks them.
            digest = cached.stem.rsplit("-", 1)[-1]
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), digest, progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            reason = (
                f"Inception weights are not available: {cached} is absent and the download from "
                f"{URL_INCEPTION_V3} failed ({exc}); set evaluate.inception_weights to a local "
                "copy of that file"
            )
            log.warning(reason)
            return None, reason
    check_inception_weights(str(cached))
    return str(cached), None


def check_inception_weights(path: str) -> None:
    """The file is a plain state dict (loaded with `weights_only`, so it cannot run code) that
    torch-fidelity's Inception network accepts: a clear error now, not deep in a run."""
    if not Path(path).is_file():
        raise EvaluationError(
            f"evaluate.inception_weights: {path} does not exist; point it at a copy of "
            f"{os.path.basename(URL_INCEPTION_V3)} or remove it to skip Inception metrics"
        )
    try:
        WeightsOnlyInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=path)
    except Exception as exc:  # pickled code, a damaged file, missing keys, wrong shapes
        raise EvaluationError(
            f"evaluate.inception_weights: {path} is not torch-fidelity's Inception-v3 state "
            f"dict ({str(exc)[:300]})"
        ) from None


def save_random_inception_weights(path: str | Path, seed: int = 0) -> None:
    """Randomly initialised weights of torch-fidelity's Inception network, for testing the
    Inception plumbing and timing it where the real weights cannot be downloaded. Scores
    computed with them are meaningless."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    with (
        mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, s: None),
    ):
        torch.manual_seed(seed)
        net = FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    torch.save(net.state_dict(), path)


def compute(
    generated: ImageDataset,
    real: ImageDataset,
    *,
    extractor: str,
    weights: str,
    metrics: tuple[str, ...],
    real_cache_name: str | None,
    cache_dir: str,
    seed: int,
    batch_size: int,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
) -> dict[str, float]:
    """torch-fidelity's metrics (`fid`, `isc`, `kid`, `prc`) of `generated` against `real`,
    under our names; the real side's features are cached as `real_cache_name`."""
    if "kid" in metrics:
        smallest = min(len(generated), len(real))
        if kid_subset_size > smallest:
            raise EvaluationError(
                f"evaluate.kid_subset_size ({kid_subset_size}) exceeds the {smallest} images "
                "available on one side; lower evaluate.kid_subset_size or use more samples"
            )
    result = torch_fidelity.calculate_metrics(
        input1=generated, input2=real, cuda=torch.cuda.is_available(),
        batch_size=batch_size, feature_extractor=extractor,
        feature_extractor_weights_path=weights, input2_cache_name=real_cache_name,
        cache_root=cache_dir, cache=real_cache_name is not None, rng_seed=seed,
        kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False,
        **{m: True for m in metrics},
    )  # fmt: skip
    return {METRIC_KEYS[k]: float(v) for k, v in result.items() if k in METRIC_KEYS}
