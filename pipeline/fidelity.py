"""torch-fidelity glue: the featurenet as a registered feature extractor, image datasets in the
form the library expects, Inception weights, the real-image feature cache, and one call that
computes a set of metrics.

The featurenet is registered through `torch_fidelity.register_feature_extractor` (the
library's extension point) under FEATURENET; it reads its weights from the directory passed
as `feature_extractor_weights_path`, as Inception reads its file.

Metrics are torch-fidelity's own functions (`fid_statistics_to_metric`,
`kid_featuresdict_to_metric`, ...) applied to features extracted by its own code
(`create_feature_extractor`, `get_featuresdict_from_dataset`), so the figures are those of
`calculate_metrics(cache=False)`. torch-fidelity's file cache is never used: it stores pickles
and loads them with `torch.load(weights_only=False)`, so a file planted under one of its
predictable names would run code. Real-image features are cached by us instead, in
`cache_dir`, one safetensors file per feature layer:

    <real_cache_name>-<extractor>-features-<layer>.safetensors
    tensor   "features": (N, D) as the extractor returned them
    metadata format (CACHE_FORMAT), name, extractor, layer, torch_fidelity (version),
             images (N), shape (of one image), fingerprint (sha256 of FINGERPRINT_IMAGES
             evenly spaced images), sha256 (of the tensor's dtype, shape and bytes)

safetensors is a JSON header plus raw bytes: reading it cannot run code. An entry is used only
when every metadata field matches the request and the checksum matches the bytes; anything
else (unreadable, another format, other data, a wrong checksum) is recomputed and rewritten,
with a warning. The checksum catches damage, not a forger: whoever can write the cache can
make figures wrong (as whoever can write the prepared data can), but never run code. Entries
are written atomically, so concurrent sweep trials never read half a file. `real_cache_name`
must identify the real images and the extractor's weights (the evaluate stage's Scorer builds
it from the dataset hash, the split and the weights' sha256). Old torch-fidelity `.pt` files
in `cache_dir` are never read; they may be deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.utils as fidelity_utils
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric

from pipeline.data import quantize
from pipeline.errors import EvaluationError
from pipeline.files import atomic_path

log = logging.getLogger(__name__)

FEATURENET = "ganpipe-featurenet"
INCEPTION = "inception-v3-compat"
DOWNLOAD_PROBE_TIMEOUT_S = 10
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# The real-image feature cache (format in the module header).
CACHE_FORMAT = "ganpipe-features-1"
CACHE_SUFFIX = ".safetensors"
CACHE_TENSOR = "features"
CACHE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
FINGERPRINT_IMAGES = 64
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
        # torch.load honours FORCE_WEIGHTS_ONLY over the library's weights_only=False, and
        # refuses to load at all while FORCE_NO_WEIGHTS_ONLY is set too; both are restored.
        with mock.patch.dict(os.environ, {FORCE_WEIGHTS_ONLY: "1"}):
            os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)
            super().__init__(name, features_list, **kwargs)


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
    under our names; the real side's features are cached in `cache_dir` as `real_cache_name`
    (None: not cached). The figures equal `torch_fidelity.calculate_metrics(cache=False)`."""
    unknown = sorted(set(metrics) - {"isc", *BINARY_METRICS})
    if unknown:
        raise EvaluationError(f"unknown metrics {unknown}; expected some of isc, fid, kid, prc")
    if "kid" in metrics:
        smallest = min(len(generated), len(real))
        if kid_subset_size > smallest:
            raise EvaluationError(
                f"evaluate.kid_subset_size ({kid_subset_size}) exceeds the {smallest} images "
                "available on one side; lower evaluate.kid_subset_size or use more samples"
            )
    cuda = torch.cuda.is_available()
    options = dict(
        batch_size=batch_size, feature_extractor=extractor, feature_extractor_weights_path=weights,
        rng_seed=seed, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    registered = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[extractor]
    layers = {m: registered.get_default_feature_layer_for_metric(m) for m in metrics}
    net = fidelity_utils.create_feature_extractor(
        extractor, sorted(set(layers.values())), cuda=cuda, **options
    )

    def features(images: ImageDataset) -> dict[str, torch.Tensor]:
        return fidelity_utils.get_featuresdict_from_dataset(
            images, net, batch_size, cuda, True, False
        )

    fake = features(generated)
    result = {}
    if "isc" in metrics:
        result |= isc_featuresdict_to_metric(fake, layers["isc"], **options)
    binary = [m for m in metrics if m in BINARY_METRICS]
    if binary:
        if real_cache_name is None:
            reals = features(real)
        else:
            reals = cached_features(real, net, real_cache_name, Path(cache_dir), features)
        for metric in binary:
            result |= BINARY_METRICS[metric](fake, reals, layers[metric], **options)
    return {METRIC_KEYS[k]: float(v) for k, v in result.items() if k in METRIC_KEYS}


def _fid(fake: dict, real: dict, layer: str, **options) -> dict:
    statistics = [fid_featuresdict_to_statistics(f, layer) for f in (fake, real)]
    return fid_statistics_to_metric(*statistics, False)


# The metrics that compare the generated set with the real one: torch-fidelity's functions.
BINARY_METRICS = {
    "fid": _fid,
    "kid": kid_featuresdict_to_metric,
    "prc": prc_featuresdict_to_metric,
}


def cached_features(real: ImageDataset, net, name: str, cache_dir: Path, extract) -> dict:
    """The real images' features for every layer `net` provides: read from `cache_dir` when
    each layer's entry is sound and was made for these images, else `extract(real)`, written
    back. The format is in the module header."""
    if not CACHE_NAME.fullmatch(name):
        raise EvaluationError(
            f"feature cache name {name!r} must be letters, digits, '.', '_' and '-' only"
        )
    identity = {
        "format": CACHE_FORMAT,
        "name": name,
        "extractor": net.get_name(),
        "torch_fidelity": torch_fidelity.__version__,
        "images": str(len(real)),
        "shape": "x".join(map(str, real[0].shape)),
        "fingerprint": _fingerprint(real),
    }
    entries = {
        layer: (cache_dir / f"{name}-{identity['extractor']}-features-{layer}{CACHE_SUFFIX}",
                identity | {"layer": layer})
        for layer in net.get_requested_features_list()
    }  # fmt: skip
    found = {layer: read_cache_entry(path, expected) for layer, (path, expected) in entries.items()}
    if all(tensor is not None for tensor in found.values()):
        return found
    features = extract(real)
    for layer, (path, expected) in entries.items():
        write_cache_entry(path, features[layer], expected)
    return features


def read_cache_entry(path: Path, expected: dict[str, str]) -> torch.Tensor | None:
    """The features in `path` if it is a sound entry made as `expected` says; None (with a
    warning naming the file and the fault, when there is a file) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as entry:
            found = entry.metadata() or {}
            tensor = entry.get_tensor(CACHE_TENSOR)
    except (OSError, SafetensorError) as exc:
        return _rejected(path, f"it is not a readable safetensors entry ({str(exc)[:200]})")
    differs = [k for k in expected if found.get(k) != expected[k]]
    if differs:
        key = differs[0]
        return _rejected(
            path,
            f"it was made for other data, another extractor or format ({key}: "
            f"{str(found.get(key))[:80]!r}, expected {expected[key]!r})",
        )
    if tensor.dim() != 2 or len(tensor) != int(expected["images"]):
        return _rejected(path, f"its features have shape {tuple(tensor.shape)}")
    if found.get("sha256") != _tensor_sha256(tensor):
        return _rejected(path, "its features do not match their sha256 (damaged or altered)")
    return tensor


def write_cache_entry(path: Path, tensor: torch.Tensor, identity: dict[str, str]) -> None:
    """`tensor` as a cache entry at `path`, atomically (a reader sees all of it or none); a
    directory that cannot be written to is a warning."""
    tensor = tensor.detach().cpu().contiguous()
    metadata = identity | {"sha256": _tensor_sha256(tensor)}
    try:
        with atomic_path(path) as tmp:
            save_file({CACHE_TENSOR: tensor}, str(tmp), metadata=metadata)
    except OSError as exc:  # a read-only or full cache directory costs time, not the result
        log.warning("feature cache entry %s could not be written (%s); not cached", path, exc)


def _rejected(path: Path, why: str) -> None:
    log.warning("feature cache entry %s is not used: %s; recomputing it", path, why)
    return None


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the dtype, shape and bytes (a header read with another dtype or shape fails)."""
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _fingerprint(images: ImageDataset) -> str:
    """sha256 of FINGERPRINT_IMAGES evenly spaced images: other images under the same cache
    name are noticed without hashing a whole split on every call."""
    picks = np.unique(np.linspace(0, len(images) - 1, FINGERPRINT_IMAGES).round().astype(int))
    digest = hashlib.sha256()
    for index in picks:
        digest.update(images[int(index)].contiguous().numpy().tobytes())
    return digest.hexdigest()
