"""params.yaml: its schema, how a file becomes a validated Params, and how problems are worded.

    schema.py     the sections and Params, every default and check (pydantic models)
    loading.py    read a params file as DVC does, apply `--set` overrides, validate; flatten
    messages.py   ParamsError and its wording: one line per problem, did-you-mean hints

Import from here: `from pipeline.config import Params, load_params`.
"""

from pipeline.config.loading import (
    DEFAULT_PARAMS_FILE,
    apply_overrides,
    flatten,
    load_params,
    parse_yaml_file,
    validate_params,
)
from pipeline.config.messages import KEY_ALIASES, MAX_PROBLEMS, ParamsError, did_you_mean
from pipeline.config.schema import (
    DIMENSIONS,
    LABELED_SOURCES,
    RANKING_METRICS,
    TUNABLE_SECTIONS,
    AugmentParams,
    Choice,
    EvaluateParams,
    FeaturenetParams,
    Grid,
    ModelParams,
    Params,
    PrepareParams,
    RankingMetric,
    RayParams,
    RegisterParams,
    SearchDimension,
    Section,
    SweepParams,
    TrackingParams,
    TrainParams,
    Uniform,
    metric_extractor,
)
from pipeline.params_yaml import parse_yaml

__all__ = [
    "DEFAULT_PARAMS_FILE",
    "DIMENSIONS",
    "KEY_ALIASES",
    "LABELED_SOURCES",
    "MAX_PROBLEMS",
    "RANKING_METRICS",
    "TUNABLE_SECTIONS",
    "Choice",
    "AugmentParams",
    "EvaluateParams",
    "FeaturenetParams",
    "Grid",
    "ModelParams",
    "Params",
    "ParamsError",
    "PrepareParams",
    "RankingMetric",
    "RayParams",
    "RegisterParams",
    "SearchDimension",
    "Section",
    "SweepParams",
    "TrackingParams",
    "TrainParams",
    "Uniform",
    "apply_overrides",
    "did_you_mean",
    "flatten",
    "load_params",
    "metric_extractor",
    "parse_yaml",
    "parse_yaml_file",
    "validate_params",
]
