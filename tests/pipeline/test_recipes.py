"""Dataset-aware defaults: the recipe for prepare.resolution fills the keys a user leaves out."""

import pytest

from pipeline.config import Params, ParamsError, load_params, validate_params
from pipeline.recipes import RECIPES, recipe_for
from tests.conftest import REPO_ROOT


def test_each_resolution_gets_its_recipe():
    assert recipe_for(8).name == recipe_for(16).name == "sngan-hinge-64"
    assert recipe_for(32).name == "dcgan-classic-32"
    assert recipe_for(64).name == recipe_for(1024).name == "sngan-hinge-64"
    at_32 = validate_params({"prepare": {"resolution": 32}})
    assert (at_32.model.g_width, at_32.model.d_width, at_32.model.d_norm) == (32, 32, "batch")
    assert (at_32.train.loss, at_32.train.beta1, at_32.train.beta2) == ("bce", 0.5, 0.999)
    at_64 = validate_params({"prepare": {"resolution": 64}})
    assert (at_64.model.g_width, at_64.model.spectral_norm_d, at_64.train.loss) == (
        64, True, "hinge"
    )  # fmt: skip


def test_the_schema_states_the_first_recipe_as_the_default():
    assert Params() == validate_params({"prepare": {"resolution": 16}})
    for section, values in RECIPES[0].values.items():
        fields = Params.model_fields[section].annotation.model_fields
        assert {k: fields[k].default for k in values} == values


def test_keys_the_user_sets_win():
    params = validate_params(
        {"prepare": {"resolution": 32}, "model": {"g_width": 48}, "train": {"loss": "hinge"}}
    )
    assert (params.model.g_width, params.model.d_width) == (48, 32)
    assert params.train.loss == "hinge" and params.train.beta1 == 0.5
    with pytest.raises(ParamsError, match="model.d_width"):  # null is no value, not "default"
        validate_params({"prepare": {"resolution": 32}, "model": {"d_width": None}})
    auto = validate_params({"prepare": {"resolution": 32}, "model": {"d_width": "auto"}})
    assert auto.model.d_width == 32


def test_a_validated_config_round_trips_whatever_its_resolution():
    """Workers and sweep trials re-validate a full dump: the recipe must not change it."""
    for resolution in (16, 32, 128):
        params = validate_params({"prepare": {"resolution": resolution}, "model": {"z_dim": 7}})
        assert validate_params(params.model_dump(mode="json")) == params


def test_shipped_params_leave_the_recipe_keys_to_the_recipe(tmp_path):
    """Changing only prepare (what a user with their own images does) changes the recipe; the
    keys are in the file (as `auto`), so `dvc exp run -S` can override them."""
    text = (REPO_ROOT / "params.yaml").read_text().replace("resolution: 16", "resolution: 32")
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert (params.model.g_width, params.train.steps, params.train.batch_size) == (32, 3000, 64)
    for section, values in RECIPES[1].values.items():
        missing = [key for key in values if f"  {key}: auto" not in text]
        assert not missing, (section, missing)


def test_a_bad_resolution_is_still_reported_by_the_schema():
    with pytest.raises(ParamsError, match="prepare.resolution"):
        validate_params({"prepare": {"resolution": "big"}})
    with pytest.raises(ParamsError, match="model: Input should be a valid dictionary"):
        validate_params({"model": 3})
