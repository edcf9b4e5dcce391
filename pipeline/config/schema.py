"""The params.yaml schema: one validated object for every stage, with every default stated here.

Sections are named after the stages that read them (DVC's convention): prepare, model, train,
sweep, evaluate, register, plus ray and tracking for where things run. Any unknown key, wrong
type, out-of-range value or inconsistent combination is a validation error whose message names
the key path, the bad value and what is allowed (pipeline/config/messages.py words them;
pipeline/config/loading.py reads a file and raises them as one ParamsError), before any stage
does work.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from gan.augment import POLICIES
from gan.losses import LOSSES
from gan.models import D_NORMS, FAMILIES
from pipeline.config.growth import batch_at, growth_schedule, images_shown, resolutions
from pipeline.config.messages import describe_problem, did_you_mean, inconsistent
from pipeline.errors import echo, shorten
from pipeline.recipes import RECIPE_NOTE, recipe_default, with_recipe

LABELED_SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10")
LossName = Literal[tuple(LOSSES)]
Family = Literal[FAMILIES]
DNorm = Literal[D_NORMS]
AugmentPolicy = Literal[POLICIES]
# Strict scalars: YAML already gives typed values, so `steps: yes` or `lr_g: true` is an error,
# not a silent 1 (ints still count as floats).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


class PrepareParams(Section):
    """Which images to prepare and how (the `prepare` stage)."""

    source: Literal[LABELED_SOURCES + ("imagefolder",)] = Field(
        "digits", description="digits is bundled with scikit-learn and needs no network"
    )
    image_dir: str | None = Field(None, description="imagefolder only: the directory of images")
    image_labels: Literal["folders", "none"] = Field(
        "folders", description="imagefolder only: class labels from subfolder names, or none"
    )
    skip_bad_images: Bool = Field(
        False, description="imagefolder only: skip unreadable files (counted in the manifest)"
    )
    follow_symlinks: Bool = Field(
        False,
        description="imagefolder only: read symbolic links in image_dir (they may point "
        "outside it); off: a link is an error",
    )
    allow_synthetic: Bool = Field(
        False,
        description="imagefolder only: images from `ganpipe synthesize` (marked in their PNG "
        "metadata) may be mixed with real ones: they go to the train split only and the "
        "manifest counts them; off: a mix is an error (a folder of synthetic images alone is "
        "prepared, marked synthetic)",
    )
    raw_dir: str = Field("data/raw", description="where downloaded datasets are kept")
    out_dir: str = Field("data/prepared", description="the Parquet shards and manifest")
    channels: Literal[1, 3] = Field(1, description="1: grayscale, 3: RGB; images are converted")
    resolution: Int = Field(16, ge=8, le=1024, description="square side; a power of two")
    test_fraction: Float = Field(
        0.2, gt=0, lt=1, description="held-out share when the source has no test split"
    )
    shard_rows: Int = Field(
        512,
        ge=1,
        description="images per Parquet shard (at most 2 GiB of pixels: one is held "
        "in memory while written)",
    )
    seed: Int = Field(0, ge=0, description="seeds the train/test split")

    @field_validator("channels", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 would slip through the Literal
            raise ValueError("Input should be 1 or 3")
        return value

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two (8, 16, 32, 64, ...)")
        return value

    @property
    def labeled(self) -> bool:
        return self.source in LABELED_SOURCES or self.image_labels == "folders"

    @model_validator(mode="after")
    def _shard_fits_in_memory(self) -> PrepareParams:
        image = self.resolution * self.resolution * self.channels
        limit = 2**31  # bytes of pixels per shard: a shard is buffered in memory while written
        if self.shard_rows * image > limit:
            size = f"{self.resolution}x{self.resolution}x{self.channels}"
            raise inconsistent(
                f"prepare.shard_rows: {self.shard_rows} images of {size} make shards of "
                f"{self.shard_rows * image / 2**30:,.0f} GiB, buffered in memory while written; "
                f"at most {limit // image} rows of {size} images (2 GiB)"
            )
        return self

    @model_validator(mode="after")
    def _image_dir_for_imagefolder(self) -> PrepareParams:
        if self.source == "imagefolder" and self.image_dir is None:
            raise inconsistent(
                "prepare.image_dir: required when prepare.source is 'imagefolder'; "
                "set it to a directory of PNG/JPEG/WebP images"
            )
        if self.source != "imagefolder" and self.image_dir is not None:
            raise inconsistent(
                f"prepare.image_dir: only used with prepare.source 'imagefolder', but source is "
                f"{self.source!r}; remove image_dir or set source: imagefolder"
            )
        return self


class ModelParams(Section):
    """Generator and discriminator architecture."""

    family: Family = Field(
        "dcgan",
        description="mlp (vanilla GAN), dcgan, resnet (SNGAN) or progan (progressive growing)",
    )
    conditional: Bool = Field(False, description="class-conditional G and projection D")
    z_dim: Int = Field(
        recipe_default("model", "z_dim"), ge=1, le=4096,
        description="latent dimension" + RECIPE_NOTE,
    )  # fmt: skip
    g_width: Int = Field(
        recipe_default("model", "g_width"), ge=1, le=4096,
        description="G base channels (hidden units for mlp)" + RECIPE_NOTE,
    )  # fmt: skip
    d_width: Int = Field(
        recipe_default("model", "d_width"), ge=1, le=4096,
        description="D base channels (hidden units for mlp)" + RECIPE_NOTE,
    )  # fmt: skip
    mlp_depth: Int = Field(3, ge=1, le=16, description="hidden layers of the mlp family")
    d_norm: DNorm = Field(
        recipe_default("model", "d_norm"),
        description="normalisation in the DCGAN discriminator" + RECIPE_NOTE,
    )
    spectral_norm_d: Bool = Field(
        recipe_default("model", "spectral_norm_d"),
        description="spectral normalisation in D (SNGAN)" + RECIPE_NOTE,
    )
    spectral_norm_g: Bool = Field(False, description="spectral normalisation in G")
    start_resolution: Int = Field(
        4, ge=4, le=512,
        description="progan: the resolution growing starts at (a power of two below "
        "prepare.resolution)",
    )  # fmt: skip


class TrainParams(Section):
    """Optimisation, regularisation, checkpoints (the `train` stage)."""

    loss: LossName = Field(
        recipe_default("train", "loss"),
        description="bce (non-saturating), lsgan (least squares), hinge, wasserstein" + RECIPE_NOTE,
    )
    steps: Int = Field(
        recipe_default("train", "steps"), ge=1, description="generator updates" + RECIPE_NOTE
    )
    batch_size: Int = Field(
        recipe_default("train", "batch_size"), ge=1,
        description="images per worker per D update" + RECIPE_NOTE,
    )  # fmt: skip
    global_batch_size: Int | None = Field(
        None, ge=1, description="batch_size x ray.num_workers; set it to have that checked"
    )
    batch_size_per_resolution: dict[int, Int] | None = Field(
        None,
        description="progan: images per worker per D update at a resolution, e.g. {4: 128, 8: "
        "128, 16: 64} (the paper's minibatch per level of detail); resolutions not listed "
        "use batch_size",
    )
    lr_g: Float = Field(
        recipe_default("train", "lr_g"), gt=0, le=1, description="Adam lr of G" + RECIPE_NOTE
    )
    lr_d: Float = Field(
        recipe_default("train", "lr_d"), gt=0, le=1, description="Adam lr of D" + RECIPE_NOTE
    )
    beta1: Float = Field(
        recipe_default("train", "beta1"), ge=0, lt=1, description="Adam beta1" + RECIPE_NOTE
    )
    beta2: Float = Field(
        recipe_default("train", "beta2"), ge=0, lt=1, description="Adam beta2" + RECIPE_NOTE
    )
    n_critic: Int = Field(1, ge=1, le=100, description="D updates per G update")
    gp_weight: Float = Field(0.0, ge=0, description="WGAN-GP lambda (0 = off)")
    stabilise_kimg: Float | None = Field(
        None, gt=0,
        description="progan: thousands of real images shown per stabilising phase (None: "
        "the run's images shared equally by the phases, the last stabilising one twice)",
    )  # fmt: skip
    fade_kimg: Float | None = Field(
        None,
        gt=0,
        description="progan: thousands of real images per fade-in (None: as stabilising)",
    )
    drift_weight: Float = Field(
        0.0, ge=0,
        description="ProGAN's drift term: this times E[D(real)^2] in D's loss, keeping a "
        "critic's outputs near 0 (the paper: 0.001 with WGAN-GP; 0 = off)",
    )  # fmt: skip
    r1_gamma: Float = Field(0.0, ge=0, description="R1 gamma (0 = off)")
    r1_every: Int = Field(1, ge=1, description="lazy R1: every k-th D update, scaled by k")
    diffaugment: tuple[AugmentPolicy, ...] = Field(
        recipe_default("train", "diffaugment"), description="DiffAugment policies" + RECIPE_NOTE
    )
    ema_kimg: Float = Field(
        10.0, ge=0, description="generator EMA half-life in thousands of images (0: no average)"
    )
    ema_rampup: Float | None = Field(
        0.01, gt=0, description="EMA half-life at most this share of the images shown (None: off)"
    )
    seed: Int = Field(0, ge=0, description="seeds weights, noise and data order (per rank)")
    checkpoint_every: Int = Field(500, ge=1, description="steps between checkpoints")
    log_every: Int = Field(50, ge=1, description="steps between metric reports")
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="auto: bf16 autocast on GPUs that support it, off on CPU (for small "
        "models fp32 is faster: bench/RESULTS.md)",
    )
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="auto: on for GPU")
    compile: Bool = Field(
        False, description="torch.compile G and D (fails for dcgan on CUDA: docs/cluster.md)"
    )
    debug_checks: Bool = Field(False, description="check all ranks agree before checkpoints")
    out_dir: str = Field("models/train", description="result.json, final weights, history")

    @field_validator("diffaugment")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a policy twice: {list(value)}")
        return value


class Choice(Section):
    """One of `values`, drawn at random (or proposed by Optuna) for each trial."""

    type: Literal["choice"]
    values: list[Any] = Field(min_length=1, description="the values to draw from")


class Grid(Section):
    """Every one of `values`: each trial sample is crossed with all of them."""

    type: Literal["grid"]
    values: list[Any] = Field(min_length=1, description="the values, each tried")


class Uniform(Section):
    """A float between `low` and `high`, uniform or uniform in log space."""

    type: Literal["uniform", "loguniform"]
    low: Float = Field(description="lower bound (> 0 for loguniform)")
    high: Float = Field(description="upper bound, above low")

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not self.low < self.high:
            raise inconsistent(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise inconsistent(f"loguniform needs low > 0, got {self.low}")
        return self


SearchDimension = Annotated[Choice | Grid | Uniform, Field(discriminator="type")]
# The search dimensions by their `type` tag.
DIMENSIONS = {"choice": Choice, "grid": Grid, "uniform": Uniform, "loguniform": Uniform}


TUNABLE_SECTIONS: dict[str, type[Section]] = {"train": TrainParams, "model": ModelParams}


class SweepParams(Section):
    """A Ray Tune sweep; the train stage runs one when `space` is not empty."""

    space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="'section.key' -> choice/grid/uniform/loguniform"
    )
    num_trials: Int = Field(8, ge=1, description="samples drawn from the space")
    max_concurrent: Int | None = Field(None, ge=1, description="None: as many as the cluster fits")
    scheduler: Literal["asha", "pbt", "fifo"] = Field(
        "asha", description="asha: stop trials behind their rung; pbt: 1-worker trials; fifo: none"
    )
    search: Literal["random", "optuna"] = Field(
        "random", description="random/grid variants, or Optuna's TPE (no grid dimensions)"
    )
    eval_every: Int = Field(200, ge=1, description="steps between trial FID evaluations")
    grace_period: Int | None = Field(
        None, ge=1, description="ASHA: steps before a trial can be stopped (None: eval_every)"
    )
    reduction_factor: Int = Field(
        3, ge=2, description="ASHA: 1/reduction_factor of the trials go on at each rung"
    )
    eval_samples: Int = Field(500, ge=2, description="generated samples per trial evaluation")
    top_k: Int = Field(3, ge=1, description="best trials handed to the evaluate stage")
    patience: Int = Field(3, ge=1, description="evaluations a collapse/worsening may last")
    collapse_margin: Float = Field(
        0.02, gt=0, lt=0.5, description="D collapse: D(x) > 1 - margin and D(G(z)) < margin"
    )
    min_class_coverage: Float = Field(
        0.5, ge=0, le=1, description="mode collapse: share of classes the featurenet finds"
    )

    @property
    def total_trials(self) -> int:
        """Tune runs num_trials samples for every combination of grid values."""
        combinations = math.prod(len(d.values) for d in self.space.values() if isinstance(d, Grid))
        return self.num_trials * combinations

    @field_validator("space")
    @classmethod
    def _tunable_keys(cls, space: dict[str, Any]) -> dict[str, Any]:
        """Every searched key is a train/model key; (values are checked in Params)."""
        for key, dim in space.items():
            section, _, field = key.partition(".")
            model = TUNABLE_SECTIONS.get(section)
            if model is None or field not in model.model_fields:
                tunable = [f"{s}.{k}" for s, m in TUNABLE_SECTIONS.items() for k in m.model_fields]
                hint = did_you_mean(key, tunable)
                raise inconsistent(
                    f"sweep.space.{shorten(key)}: not a train.* or model.* key{hint}"
                )
            if isinstance(dim, Uniform) and model.model_fields[field].annotation is not float:
                raise inconsistent(
                    f"sweep.space.{key}: {dim.type} needs a float key; use choice or grid"
                )
        return space


class FeaturenetParams(Section):
    """The domain classifier whose features and logits score generators offline (`featurenet`)."""

    epochs: Int = Field(
        10, ge=1, le=1000, description="passes over the train split (~2 min: 8k 32-px RGB images)"
    )
    batch_size: Int = Field(128, ge=1, description="images per optimiser step")
    lr: Float = Field(2e-3, gt=0, le=1, description="Adam learning rate (cosine-decayed)")
    width: Int = Field(32, ge=4, le=1024, description="channels of the first conv block")
    feature_dim: Int = Field(128, ge=2, le=4096, description="penultimate features (FID/KID)")
    min_skill: Float = Field(
        0.5, ge=0, le=1,
        description="the stage fails below this held-out skill, (accuracy - chance) / "
        "(1 - chance) (0: none)",
    )  # fmt: skip
    min_accuracy: Float = Field(
        0.0, ge=0, le=1, description="an absolute floor on held-out accuracy too (0: none)"
    )
    seed: Int = Field(0, ge=0, description="seeds weights and data order")
    out_dir: str = Field("models/featurenet", description="weights and their description")
    metrics_file: str = Field(
        "metrics/featurenet.json", description="DVC metrics: held-out accuracy, training time"
    )


# Metrics a candidate can be ranked by, and which way is better. `_domain` metrics use the
# featurenet, `_inception` ones torch-fidelity's Inception-v3: the two are never compared.
RANKING_METRICS = {
    **{f"{m}_{x}": "min" for m in ("fid", "kid") for x in ("domain", "inception")},
    **{f"{m}_{x}": "max" for m in ("is", "precision", "recall") for x in ("domain", "inception")},
    "class_coverage_domain": "max",
    "cas_accuracy": "max",
    # the augment stage's: accuracy gained by adding the generator's images to k real ones
    "augment_gain": "max",
    "augment_gain_vs_classical": "max",
    "augment_cas": "max",
}
RankingMetric = Literal[tuple(RANKING_METRICS)]


def metric_extractor(metric: str) -> str:
    """Which protocol a ranking metric is comparable under: the feature extractor it is
    computed with ('domain' or 'inception'), or the augment stage's ('augment')."""
    if metric.startswith("augment_"):
        return "augment"
    return "inception" if metric.endswith("_inception") else "domain"


class EvaluateParams(Section):
    """FID / IS / KID / precision-recall protocol (the `evaluate` stage)."""

    num_samples: Int = Field(2000, ge=2, description="generated samples per candidate")
    split: Literal["train", "test"] = Field("train", description="real split to compare with")
    inception: Bool = Field(False, description="also compute Inception-v3 metrics (GPU)")
    inception_weights: str | None = Field(
        None, description="local Inception weights (.pth state dict) for air-gapped clusters"
    )
    kid_subset_size: Int = Field(1000, ge=2, description="KID subset size, <= num_samples")
    kid_subsets: Int = Field(100, ge=1, description="KID subsets averaged")
    prc_neighborhood: Int = Field(3, ge=1, description="k of the k-NN precision/recall balls")
    batch_size: Int = Field(256, ge=1, description="images per generator/extractor batch")
    generator: Literal["best", "ema", "raw"] = Field(
        "best", description="both are scored; which one is the candidate (best: by register.metric)"
    )
    seed: Int = Field(0, ge=0, description="seeds the generated samples")
    cache_dir: str = Field(
        ".cache/fidelity", description="real-data features, reused across candidates and runs"
    )
    out_dir: str = Field(
        "models/evaluate", description="report.json (scores, protocol), grids, generators"
    )
    metrics_dir: str = Field(
        "metrics/evaluate", description="DVC metrics: c1.json ... per candidate, real.json"
    )

    @model_validator(mode="after")
    def _kid_subset_fits(self) -> EvaluateParams:
        if self.kid_subset_size > self.num_samples:
            raise inconsistent(
                f"evaluate.kid_subset_size ({self.kid_subset_size}) must not exceed "
                f"evaluate.num_samples ({self.num_samples}); lower one or raise the other"
            )
        return self


CLASSICAL_TRANSFORMS = ("flip", *POLICIES)  # the augment stage's classical augmentation
Shots = Annotated[int, Strict(), Field(ge=1)] | Literal["all"]


class AugmentParams(Section):
    """Does adding the generator's images help a classifier trained on little real data?
    (the `augment` stage: the featurenet recipe on k real images per class, alone, with
    classical augmentation, and with synthetic images; docs/stages.md)."""

    enabled: Bool = Field(True, description="run the measurement (off: the stage writes nothing)")
    shots: tuple[Shots, ...] = Field(
        (10, 50), min_length=1, description="real images per class (all: the whole train split)"
    )
    ratios: tuple[Float, ...] = Field(
        (1.0, 4.0), min_length=1, description="synthetic images added per real image"
    )
    seeds: Int = Field(3, ge=1, le=50, description="repeats of every setting (subset, init)")
    classical: Literal["auto"] | tuple[Literal[CLASSICAL_TRANSFORMS], ...] = Field(
        "auto",
        description="the classical baseline's transforms; auto: color, translation, cutout, "
        "and flip for RGB images (a flip changes a digit)",
    )
    min_confidence: Float = Field(
        0.9, ge=0, lt=1,
        description="unconditional generators: keep a sample when the classifier of the same "
        "k real images gives its class this softmax probability",
    )  # fmt: skip
    epochs: Int = Field(
        5, ge=1, le=1000,
        description="every setting of one k trains as many steps: this many passes over the "
        "largest training set of that k (real + the most synthetic), and at least min_steps",
    )  # fmt: skip
    min_steps: Int = Field(100, ge=1, description="the fewest steps a setting trains")
    seed: Int = Field(0, ge=0, description="seeds the real subsets, the noise and the weights")
    out_dir: str = Field(
        "models/augment", description="report.json (every figure, the protocol), the plot"
    )
    metrics_dir: str = Field(
        "metrics/augment", description="DVC metrics: real.json, classic.json, c1.json ..."
    )

    @field_validator("shots")
    @classmethod
    def _distinct_shots(cls, shots: tuple) -> tuple:
        if len(set(shots)) != len(shots):
            raise ValueError(f"augment.shots must not repeat a value, got {list(shots)}")
        return shots

    @field_validator("ratios")
    @classmethod
    def _positive_ratios(cls, ratios: tuple) -> tuple:
        if any(r <= 0 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"augment.ratios must be distinct and above 0, got {list(ratios)}")
        return ratios


class RegisterParams(Section):
    """Which candidate becomes the registered model (the `register` stage)."""

    model_name: str = Field(
        "ganpipe-generator", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="registered model name: models:/NAME@ALIAS",
    )  # fmt: skip
    alias: str = Field(
        "champion", pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description="the best version so far"
    )
    challenger_alias: str = Field(
        "challenger", pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description="the newest version"
    )
    metric: RankingMetric = Field(
        "fid_domain", description="the candidates' ranking metric (lower FID/KID is better)"
    )
    out_file: str = Field(
        "models/register/registered.json", description="the version registered, and why"
    )

    @model_validator(mode="after")
    def _two_aliases(self) -> RegisterParams:
        if self.alias == self.challenger_alias:
            raise inconsistent(
                f"register.challenger_alias must differ from register.alias ({self.alias!r})"
            )
        return self


class RayParams(Section):
    """Where training runs; RAY_ADDRESS in the environment overrides `address`."""

    address: str | None = Field(None, description="None: start a local Ray")
    num_workers: Int = Field(2, ge=1, description="DDP ranks per training run")
    use_gpu: Bool | Literal["auto"] = Field("auto", description="auto: GPUs when present")
    cpus_per_worker: Float = Field(1.0, gt=0, description="CPUs Ray reserves per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers; STRICT_SPREAD: one per node"
    )
    storage_path: str = Field("runs", description="checkpoint storage: a directory or s3://")
    max_failures: Int = Field(0, ge=-1, description="worker failures to recover (-1: no limit)")


class TrackingParams(Section):
    """MLflow; MLFLOW_TRACKING_URI in the environment overrides `uri`."""

    uri: str = Field("sqlite:///mlflow.db", description="a database or http(s) tracking server")
    experiment: str = Field("ganpipe", min_length=1, description="MLflow experiment name")


def _requested_resolution(raw: Mapping) -> int:
    """prepare.resolution as given, or its default when absent or invalid (the schema then
    reports it)."""
    prepare = raw.get("prepare")
    value = prepare.get("resolution") if isinstance(prepare, Mapping) else None
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return value if valid else PrepareParams.model_fields["resolution"].default


# pydantic warns, once, when Params is defined, that the `register` section shadows
# ABCMeta.register (instances are unaffected): silenced here only, leaving the warning filters
# of the program that imports this module as they were.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(Section):
        """Everything in params.yaml."""

        prepare: PrepareParams = Field(default_factory=PrepareParams)
        model: ModelParams = Field(default_factory=ModelParams)
        train: TrainParams = Field(default_factory=TrainParams)
        sweep: SweepParams = Field(default_factory=SweepParams)
        featurenet: FeaturenetParams = Field(default_factory=FeaturenetParams)
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        augment: AugmentParams = Field(default_factory=AugmentParams)
        register: RegisterParams = Field(default_factory=RegisterParams)
        ray: RayParams = Field(default_factory=RayParams)
        tracking: TrackingParams = Field(default_factory=TrackingParams)

        @model_validator(mode="before")
        @classmethod
        def _empty_sections(cls, data: Any) -> Any:
            """`train:` with nothing under it means "all defaults", as YAML readers expect; the
            defaults of the recipe keys follow `prepare.resolution` (pipeline/recipes.py)."""
            if not isinstance(data, Mapping):
                return data
            data = {k: ({} if v is None else v) for k, v in data.items()}
            return with_recipe(data, _requested_resolution(data))

        def _check_growth(self) -> None:
            """progan: a start resolution it can grow from, batch sizes for its resolutions,
            and a run long enough to reach the final resolution with the phase lengths given
            (the run's last step trains the final resolution faded in)."""
            model, train = self.model, self.train
            start, final = model.start_resolution, self.prepare.resolution
            if start & (start - 1) or start >= final:
                raise inconsistent(
                    f"model.start_resolution ({start}) must be a power of two below "
                    f"prepare.resolution ({final}) for model.family 'progan'"
                )
            grown = resolutions(self)
            other = sorted(set(train.batch_size_per_resolution or {}) - set(grown))
            if other:
                raise inconsistent(
                    f"train.batch_size_per_resolution names {other}, not resolutions this run "
                    f"grows through ({', '.join(map(str, grown))}: model.start_resolution to "
                    "prepare.resolution)"
                )
            if train.compile:
                raise inconsistent(
                    "train.compile: true with model.family 'progan': every fade-in step sets a "
                    "new alpha, a new constant to torch.compile (it recompiles until its limit, "
                    "then runs uncompiled); set train.compile: false"
                )
            small = {r: b for r, b in (train.batch_size_per_resolution or {}).items() if b < 1}
            if small:
                raise inconsistent(f"train.batch_size_per_resolution: {small} must be >= 1")
            if train.stabilise_kimg is None and train.fade_kimg is None:
                return  # shared out over the run's images: it reaches the end
            schedule = growth_schedule(self)
            final_start = schedule.phases()[-1].start
            last = images_shown(self, train.steps - 1)
            if last < final_start:
                doublings = len(grown) - 1
                batches = sorted({batch_at(self, r) for r in grown})
                raise inconsistent(
                    f"model.family 'progan' grows from {start} to {final} px in {doublings} "
                    f"doublings: {final_start:,} real images before the final resolution "
                    f"stabilises (train.stabilise_kimg {train.stabilise_kimg or train.fade_kimg:g}"
                    f", fade_kimg {train.fade_kimg or train.stabilise_kimg:g}), but the run's last "
                    f"step starts after {last:,} (train.steps x batch "
                    f"{'/'.join(map(str, batches))} x ray.num_workers x n_critic); raise "
                    "train.steps or shorten the phases"
                )

        @model_validator(mode="after")
        def _consistent(self) -> Params:
            model, train, prepare = self.model, self.train, self.prepare
            if model.conditional and not prepare.labeled:
                raise inconsistent(
                    "model.conditional: true needs labels, but prepare.source 'imagefolder' with "
                    "prepare.image_labels 'none' has none; set model.conditional: false or use "
                    "image_labels: folders (one subfolder per class)"
                )
            if train.loss == "wasserstein" and train.gp_weight == 0 and not model.spectral_norm_d:
                raise inconsistent(
                    "train.loss: 'wasserstein' needs a Lipschitz critic, but train.gp_weight is 0 "
                    "and model.spectral_norm_d is false; set train.gp_weight (10 is usual) or "
                    "model.spectral_norm_d: true"
                )
            if train.gp_weight > 0 and model.family == "dcgan" and model.d_norm == "batch":
                raise inconsistent(
                    "train.gp_weight > 0 with model.d_norm 'batch': the gradient penalty is per "
                    "sample and batch norm mixes samples (Gulrajani et al. 2017, section 4); "
                    "use model.d_norm: layer, instance or none"
                )
            expected = train.batch_size * self.ray.num_workers
            if train.global_batch_size is not None and train.global_batch_size != expected:
                raise inconsistent(
                    f"train.global_batch_size ({train.global_batch_size}) must equal "
                    f"train.batch_size ({train.batch_size}) x ray.num_workers "
                    f"({self.ray.num_workers}) = {expected}; fix one or remove global_batch_size"
                )
            if self.sweep.scheduler == "pbt" and self.ray.num_workers != 1:
                raise inconsistent(
                    f"sweep.scheduler 'pbt' needs ray.num_workers: 1 (Ray's PBT cannot exploit "
                    f"multi-worker Train runs), got {self.ray.num_workers}; use scheduler: asha"
                )
            metric = self.register.metric
            if metric.endswith("_inception") and not self.evaluate.inception:
                raise inconsistent(
                    f"register.metric {metric!r} needs evaluate.inception: true; "
                    "set it (and evaluate.inception_weights offline) or rank by a _domain metric"
                )
            if metric.startswith("augment_") and not self.augment.enabled:
                raise inconsistent(
                    f"register.metric {metric!r} is a figure of the augment stage, which "
                    "augment.enabled: false turns off; enable it or rank by another metric"
                )
            if model.family == "progan":
                self._check_growth()
            elif train.batch_size_per_resolution is not None:
                raise inconsistent(
                    "train.batch_size_per_resolution is for model.family 'progan' (a batch per "
                    f"resolution it grows through); {model.family!r} trains at one resolution: "
                    "remove it and set train.batch_size"
                )
            if metric == "cas_accuracy" and not model.conditional:
                raise inconsistent(
                    "register.metric 'cas_accuracy' needs model.conditional: true (the classifier "
                    "trained on generated images learns from their class labels)"
                )
            if self.sweep.space:
                self._check_sweep()
            return self

        def _check_sweep(self) -> None:
            """The sweep fits the run, and every value it can draw gives a valid configuration."""
            sweep = self.sweep
            if sweep.top_k > sweep.total_trials:
                raise inconsistent(
                    f"sweep.top_k ({sweep.top_k}) must not exceed the {sweep.total_trials} trials "
                    f"(sweep.num_trials {sweep.num_trials} x every grid combination)"
                )
            if sweep.eval_every > self.train.steps:
                raise inconsistent(
                    f"sweep.eval_every ({sweep.eval_every}) is above train.steps "
                    f"({self.train.steps}): no trial would ever be scored; lower eval_every"
                )
            if (sweep.grace_period or 0) >= self.train.steps:
                raise inconsistent(
                    f"sweep.grace_period ({sweep.grace_period}) must be below train.steps "
                    f"({self.train.steps}): ASHA could never stop a trial; lower it"
                )
            grids = [k for k, d in sweep.space.items() if isinstance(d, Grid)]
            if sweep.search == "optuna" and grids:
                raise inconsistent(
                    f"sweep.search 'optuna' cannot search grid dimensions ({', '.join(grids)} in "
                    "sweep.space); use type: choice, or search: random"
                )
            base = self.model_dump(exclude={"sweep"})
            for key, dim in sweep.space.items():
                section, field = key.split(".", 1)
                for value in getattr(dim, "values", None) or (dim.low, dim.high):
                    trial = copy.deepcopy(base)
                    trial[section][field] = value
                    try:
                        Params.model_validate(trial)
                    except ValidationError as exc:
                        reasons = "; ".join(
                            describe_problem(e, Params, DIMENSIONS) for e in exc.errors()
                        )
                        raise inconsistent(
                            f"sweep.space.{key}: value {echo(value)} gives an invalid trial: "
                            f"{reasons}"
                        ) from None

        @property
        def global_batch_size(self) -> int:
            return self.train.batch_size * self.ray.num_workers
