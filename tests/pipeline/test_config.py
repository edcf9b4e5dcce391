import math
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import (
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    parse_yaml,
    validate_params,
)
from tests.conftest import REPO_ROOT

SECTIONS = {name: field.annotation for name, field in Params.model_fields.items()}
KNOWN_KEYS = [(section, key) for section, model in SECTIONS.items() for key in model.model_fields]


def test_defaults_validate_and_every_section_exists():
    params = validate_params({})
    assert set(SECTIONS) == {
        "prepare", "model", "train", "sweep", "featurenet", "evaluate", "augment", "register",
        "ray", "tracking",
    }  # fmt: skip
    assert params.train.loss == "hinge"
    assert params.global_batch_size == params.train.batch_size * params.ray.num_workers


def test_shipped_params_file_is_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.prepare.source == "digits"


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()
    path.write_text("train:\nmodel:\n")
    assert load_params(path) == Params()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lerning_rate": 1e-3}}, ["train.lerning_rate", "unknown key", "'lr_g'"]),
        ({"train": {"lr_gg": 1e-3}}, ["train.lr_gg", "did you mean 'lr_g'"]),
        ({"trian": {}}, ["trian", "did you mean 'train'"]),
        ({"model": {"famly": "mlp"}}, ["model.famly", "did you mean 'family'"]),
        ({"train": {"zzz": 1}}, ["train.zzz", "allowed keys:", "lr_g"]),
        ({"train": {"steps": "many"}}, ["train.steps", "valid integer", "'many'"]),
        ({"train": {"lr_g": -1}}, ["train.lr_g", "greater than 0", "-1"]),
        ({"train": {"lr_d": 2}}, ["train.lr_d", "less than or equal to 1"]),
        ({"train": {"loss": "minimax"}}, ["train.loss", "'hinge'", "'minimax'"]),
        ({"train": {"ema_kimg": -1.0}}, ["train.ema_kimg", "greater than or equal to 0"]),
        ({"train": {"ema_decay": 0.999}}, ["train.ema_decay", "did you mean 'ema_kimg'"]),
        ({"train": {"gp_weight": float("inf")}}, ["train.gp_weight", "finite number"]),
        ({"ray": {"cpus_per_worker": float("nan")}}, ["ray.cpus_per_worker", "finite number"]),
        ({"train": {"diffaugment": ["color", "color"]}}, ["train.diffaugment", "twice"]),
        ({"train": {"diffaugment": ["zoom"]}}, ["train.diffaugment.0", "'translation'"]),
        ({"prepare": {"resolution": 24}}, ["prepare.resolution", "power of two", "24"]),
        ({"prepare": {"channels": 2}}, ["prepare.channels", "1 or 3"]),
        ({"prepare": {"source": "imagenet"}}, ["prepare.source", "'digits'"]),
        ({"model": {"d_norm": "spectral"}}, ["model.d_norm", "'layer'"]),
        ({"ray": {"num_workers": 0}}, ["ray.num_workers", "greater than or equal to 1"]),
        ({"ray": {"use_gpu": "maybe"}}, ["ray.use_gpu", "'auto'"]),
        ({"register": {"model_name": "has space"}}, ["register.model_name", "pattern"]),
        ({"train": [1, 2]}, ["train", "valid dictionary"]),
        # inconsistent combinations
        (
            {
                "model": {"conditional": True},
                "prepare": {"source": "imagefolder", "image_dir": "x", "image_labels": "none"},
            },
            ["model.conditional", "prepare.image_labels", "needs labels"],
        ),
        ({"prepare": {"source": "imagefolder"}}, ["prepare.image_dir", "required"]),
        ({"prepare": {"image_dir": "imgs"}}, ["prepare.image_dir", "only used with"]),
        (
            {"train": {"loss": "wasserstein"}, "model": {"spectral_norm_d": False}},
            ["train.loss", "train.gp_weight", "Lipschitz"],
        ),
        (
            {"train": {"gp_weight": 10}, "model": {"d_norm": "batch"}},
            ["train.gp_weight", "model.d_norm", "per sample"],
        ),
        ({"train": {"global_batch_size": 100}}, ["train.global_batch_size", "= 256"]),
        ({"evaluate": {"num_samples": 50}}, ["evaluate.kid_subset_size", "evaluate.num_samples"]),
        ({"sweep": {"scheduler": "pbt"}}, ["sweep.scheduler", "ray.num_workers"]),
        (
            {"sweep": {"space": {"train.lr": {"type": "choice", "values": [1]}}}},
            ["sweep.space.train.lr: not a train.* or model.* key", "did you mean 'train.lr_g'"],
        ),
        (
            {"sweep": {"space": {"train.lr_g": {"type": "loguniform", "low": 0, "high": 1}}}},
            ["sweep.space.train.lr_g", "low > 0"],
        ),
        (
            {"sweep": {"space": {"train.lr_g": {"type": "normal"}}}},
            ["sweep.space.train.lr_g", "'loguniform'"],
        ),
        (
            {"sweep": {"space": {"train.loss": {"type": "choice", "values": ["hinge", "gan"]}}}},
            ["sweep.space.train.loss: value 'gan' gives an invalid trial", "'wasserstein'"],
        ),
        (
            {"sweep": {"space": {"train.lr_d": {"type": "uniform", "low": 0.1, "high": 2}}}},
            ["sweep.space.train.lr_d: value 2.0 gives an invalid trial", "less than or equal to 1"],
        ),
        (
            {"sweep": {"space": {"train.n_critic": {"type": "uniform", "low": 1, "high": 5}}}},
            ["sweep.space", "train.n_critic: uniform needs a float key"],
        ),
        (
            {
                "model": {"d_norm": "batch"},
                "sweep": {"space": {"train.gp_weight": {"type": "uniform", "low": 1, "high": 9}}},
            },
            ["sweep.space.train.gp_weight: value 1.0 gives an invalid trial", "model.d_norm"],
        ),
        (
            {"sweep": {"space": {"train.lr_g": {"type": "uniform", "lo": 1e-5, "high": 1e-3}}}},
            ["sweep.space.train.lr_g.lo: unknown key", "did you mean 'low'"],
        ),
        (
            {"sweep": {"top_k": 17, "space": {"train.seed": {"type": "grid", "values": [0, 1]}}}},
            ["sweep.top_k (17) must not exceed the 16 trials (sweep.num_trials 8 x every grid"],
        ),
        (
            {
                "train": {"steps": 50},
                "sweep": {"space": {"train.seed": {"type": "grid", "values": [0]}}},
            },
            ["sweep.eval_every (200) is above train.steps (50)"],
        ),
        (
            {
                "train": {"steps": 400},
                "sweep": {
                    "grace_period": 400,
                    "space": {"train.seed": {"type": "grid", "values": [0]}},
                },
            },
            ["sweep.grace_period (400) must be below train.steps (400)"],
        ),
        (
            {"sweep": {"reduction_factor": 1}},
            ["sweep.reduction_factor", "greater than or equal to 2"],
        ),
        (
            {
                "sweep": {
                    "search": "optuna",
                    "space": {"train.seed": {"type": "grid", "values": [0, 1]}},
                }
            },
            ["sweep.search 'optuna' cannot search grid dimensions", "train.seed"],
        ),
        ({"train": {"steps": True}}, ["train.steps", "valid integer", "True"]),
        ({"model": {"conditional": "yes"}}, ["model.conditional", "valid boolean", "'yes'"]),
        ({"prepare": {"channels": True}}, ["prepare.channels", "1 or 3"]),
    ],
)
def test_bad_params_name_the_key_value_and_what_is_allowed(raw, expected):
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ParamsError) as info:
        validate_params({"train": {"lr_g": 0, "steps": 0, "typo": 1}})
    assert str(info.value).count("\n  - ") == 3


def test_consistent_combinations_pass():
    params = validate_params(
        {
            "train": {"loss": "wasserstein", "gp_weight": 10, "global_batch_size": 128},
            "model": {"spectral_norm_d": False, "d_norm": "layer", "conditional": True},
            "ray": {"num_workers": 1},
            "sweep": {
                "scheduler": "pbt",
                "space": {
                    "train.lr_g": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
                    "model.family": {"type": "choice", "values": ["dcgan", "resnet"]},
                },
            },
        }
    )
    assert params.sweep.space["train.lr_g"].high == 1e-3


def test_overrides_set_nested_values_parsed_as_yaml():
    raw = apply_overrides(
        {"train": {"lr_g": 1.0}, "model": None},
        ["train.lr_g=1e-4", "model.family=mlp", "train.diffaugment=[color, cutout]"],
    )
    assert raw == {
        "train": {"lr_g": 1e-4, "diffaugment": ["color", "cutout"]},
        "model": {"family": "mlp"},
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.lr_g", "expected section.key=value"), ("train.lr_g.x=1", "train.lr_g is a value")],
)
def test_malformed_overrides_are_errors(override, message):
    with pytest.raises(ParamsError, match=message):
        apply_overrides({"train": {"lr_g": 0.1}}, [override])


def test_override_of_unknown_key_fails_like_the_file_would(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr_g: 0.001\n")
    assert load_params(path, ["train.lr_g=3e-4"]).train.lr_g == 3e-4
    with pytest.raises(ParamsError, match="train.lr: unknown key"):
        load_params(path, ["train.lr=3e-4"])


def test_yaml_reads_on_off_as_strings_like_yaml_1_2(tmp_path):
    assert parse_yaml("a: on\nb: off\nc: yes\nd: true\ne: False") == {
        "a": "on", "b": "off", "c": "yes", "d": True, "e": False,
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  channels_last: on\n")
    params = load_params(path, ["train.mixed_precision=off"])
    assert (params.train.channels_last, params.train.mixed_precision) == ("on", "off")


def test_overrides_reach_sweep_space_keys_with_dots():
    raw = apply_overrides(
        {}, ["sweep.space.train.lr_g.type=loguniform", "sweep.space.train.lr_g.low=1e-5"]
    )
    assert raw == {"sweep": {"space": {"train.lr_g": {"type": "loguniform", "low": 1e-5}}}}


def test_yaml_reads_exponent_floats_like_yaml_1_2():
    assert parse_yaml("a: 1e-4\nb: 2E3\nc: 7\nd: '1e-4'") == {
        "a": 1e-4,
        "b": 2000.0,
        "c": 7,
        "d": "1e-4",
    }


def test_file_problems_are_params_errors(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_params_are_immutable():
    params = Params()
    with pytest.raises(Exception, match="frozen"):
        params.train.lr_g = 1.0  # a stage must not change the config it was given


# --- fuzzing: any mutation either validates (and is kept) or fails with a ParamsError that names
# --- the mutated key; never another exception.

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["digits", "mlp", "hinge", "auto", "batch", "PACK", "", "1e-4"]),
    st.text(max_size=8),
    st.lists(st.sampled_from(["color", "cutout", "x", 1]), max_size=3),
    st.dictionaries(st.sampled_from(["type", "values", "low"]), st.integers(), max_size=2),
)
KEYS = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.tuples(st.sampled_from(sorted(SECTIONS)), st.from_regex(r"[a-z_]{1,12}", fullmatch=True)),
)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_fuzzed_params_fail_cleanly_naming_a_mutated_key(mutations):
    raw: dict = {}
    for (section, key), value in mutations:
        raw.setdefault(section, {})[key] = value
    paths = {f"{section}.{key}" for section, sub in raw.items() for key in sub}
    try:
        params = validate_params(raw)
    except ParamsError as exc:
        problems = str(exc).splitlines()[1:]
        assert problems
        for line in problems:
            assert any(path in line for path in paths), line
    else:
        for path in paths:
            section, key = path.split(".", 1)
            accepted = getattr(getattr(params, section), key)
            value = raw[section][key]
            dumped = Params.model_validate(
                yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json")))
            )
            assert dumped == params  # what validated round-trips through YAML
            if isinstance(value, bool) or value is None:
                assert accepted is value  # never turned into 0/1
            elif isinstance(value, (int, float)) and isinstance(accepted, (int, float)):
                assert _same(float(accepted), float(value))


# --- issue 13: errors stay short; files read as DVC reads them; bad paths are messages.


def test_a_huge_value_under_an_unknown_key_gives_a_short_message():
    with pytest.raises(ParamsError) as caught:
        validate_params({"train": {"typo": "x" * 10_000_000}})
    message = str(caught.value)
    assert "train.typo: unknown key" in message
    assert "10,000,002 characters" in message  # the echo says how long the value was
    assert len(message) < 2_000


def test_a_huge_key_and_a_huge_override_give_short_messages():
    with pytest.raises(ParamsError) as caught:
        validate_params({"train": {"k" * 1_000_000: 1}})
    assert len(str(caught.value)) < 2_000
    with pytest.raises(ParamsError) as caught:
        apply_overrides({}, ["train.lr_g.x=" + "9" * 1_000_000])
    assert len(str(caught.value)) < 2_000
    with pytest.raises(ParamsError) as caught:
        validate_params({"sweep": {"space": {"x" * 1_000_000: {"type": "choice", "values": [1]}}}})
    assert len(str(caught.value)) < 2_000


def test_a_list_of_many_bad_values_lists_the_first_problems_only():
    with pytest.raises(ParamsError) as caught:
        validate_params({"train": {"diffaugment": [f"bad{i}" for i in range(10_000)]}})
    lines = str(caught.value).splitlines()
    assert len(lines) < 40
    assert "more problems" in lines[-1]


def test_an_alias_bomb_in_the_params_file_is_a_short_params_error(tmp_path):
    from tests.pipeline.test_params_yaml import alias_bomb

    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(ParamsError, match="aliases .* expand") as caught:
        load_params(path)
    assert str(path) in str(caught.value) and len(str(caught.value)) < 500


def test_the_file_is_read_as_yaml_1_2_like_dvc(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  steps: 010\n")
    assert load_params(path).train.steps == 10
    path.write_text("train:\n  steps: 10\n  steps: 20\n")
    with pytest.raises(ParamsError, match=r"duplicate key \"steps\""):
        load_params(path)
    path.write_text("tracking:\n  experiment: 1:30\n")
    assert load_params(path).tracking.experiment == "1:30"


def test_override_values_are_read_as_yaml_1_2_too(tmp_path):
    from tests.pipeline.test_params_yaml import flow_alias_bomb

    path = tmp_path / "params.yaml"
    path.write_text("")
    params = load_params(path, ["train.steps=010", "tracking.experiment=1:30", "train.lr_g=2e-4"])
    assert (params.train.steps, params.tracking.experiment) == (10, "1:30")
    assert params.train.lr_g == 2e-4
    with pytest.raises(ParamsError, match="aliases .* expand"):
        apply_overrides({}, ["train.x=" + flow_alias_bomb()])


def test_a_non_utf8_file_or_a_directory_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"train:\n  loss: \xe9\n")  # Latin-1
    with pytest.raises(ParamsError, match=r"not UTF-8 .*line 2"):
        load_params(path)
    with pytest.raises(ParamsError, match="is a directory"):
        load_params(tmp_path)


# The libraries pipeline.config imports set warning filters of their own when imported (numpy,
# torch, ruamel.yaml): imported first, so that only what ganpipe's code adds is compared.
IMPORT_CHECK = """
import warnings
import gan, numpy, pydantic, ruamel.yaml, torch, yaml
before = list(warnings.filters)
import pipeline.config
print(repr([f for f in warnings.filters if f not in before]))
"""


def test_importing_the_config_leaves_the_warning_filters_alone_and_warns_nothing():
    # -W always: any warning raised during the import is printed to stderr
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", IMPORT_CHECK],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (result.stdout.strip(), result.stderr) == ("[]", "")


def progan(**train) -> dict:
    """progan from 4 to 16 px (phases: stabilise 4, fade 8, stabilise 8, fade 16, stabilise
    16) on one worker at batch 32."""
    return {
        "model": {"family": "progan", "start_resolution": 4},
        "train": {"batch_size": 32, **train},
        "ray": {"num_workers": 1},
        "prepare": {"resolution": 16},
    }


@pytest.mark.parametrize(
    ("train", "message"),
    [
        # 0.4 kimg phases: 1,600 images before 16 px stabilises; 50 steps x 32 reach it only
        # after the last step (its stage is still fading in)
        ({"steps": 50, "stabilise_kimg": 0.4, "fade_kimg": 0.4},
         "1,600 real images before the final resolution stabilises .* the run's last step "
         r"starts after 1,568 \(train.steps x batch 32"),
        # with 8 px and 16 px at batch 16, 80 steps no longer reach it
        ({"steps": 80, "stabilise_kimg": 0.4, "fade_kimg": 0.4,
          "batch_size_per_resolution": {8: 16, 16: 16}}, "starts after 1,472 .*batch 16/32"),
        ({"batch_size_per_resolution": {32: 8}},
         r"names \[32\], not resolutions this run grows through \(4, 8, 16"),
        ({"batch_size_per_resolution": {4: 0}}, "batch_size_per_resolution: {4: 0} must be >= 1"),
        ({"compile": True}, "every fade-in step sets a new alpha"),
    ],
)  # fmt: skip
def test_progan_phases_and_batches_that_do_not_fit_the_run_are_refused(train, message):
    with pytest.raises(ParamsError, match=message):
        validate_params(progan(**train))


def test_progan_runs_that_fit_and_a_batch_per_resolution_elsewhere_is_refused():
    from pipeline.config.growth import growth_schedule, images_shown, loader_batch_size

    fits = validate_params(progan(steps=51, stabilise_kimg=0.4, fade_kimg=0.4))
    assert images_shown(fits, 50) == 1600  # the last step trains 16 px faded in
    params = validate_params(progan(steps=100, batch_size_per_resolution={4: 96, 8: 64}))
    assert loader_batch_size(params) == 32  # gcd(96, 64, 32): each step joins whole batches
    # unset phases: equal images per phase, the last twice, whatever the batches
    schedule = growth_schedule(params)
    assert schedule.stabilise_images == schedule.fade_images
    assert images_shown(params, 100) == pytest.approx(6 * schedule.stabilise_images, rel=0.05)
    assert schedule.at(images_shown(params, 99)).resolution == 16
    with pytest.raises(ParamsError, match="batch_size_per_resolution is for model.family"):
        validate_params({"train": {"batch_size_per_resolution": {4: 32}}})
