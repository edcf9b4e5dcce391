"""pipeline.reference: docs/configuration.md is generated from the schema and kept current."""

from __future__ import annotations

import difflib
import re

import pytest
from pydantic import Field, create_model

from pipeline import reference
from pipeline.config import DIMENSIONS, Params, TrainParams, parse_yaml
from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "configuration.md"
FIX = "python -m pipeline.reference > docs/configuration.md"


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(heading, key): [type, default, allowed, description]} for every table row, under the
    nearest heading above it."""
    rows, heading = {}, ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[(heading, cells[0].strip("`"))] = cells[1:]
    return rows


def read_default(cell: str):
    assert cell.startswith("`") and cell.endswith("`"), cell
    return parse_yaml(cell[1:-1])


def test_committed_reference_is_up_to_date():
    expected = reference.render()
    committed = DOC.read_text() if DOC.is_file() else ""
    if committed != expected:
        diff = difflib.unified_diff(
            committed.splitlines(), expected.splitlines(), "committed", "generated", lineterm=""
        )
        shown = "\n".join(list(diff)[:30])
        stale = "docs/configuration.md is out of date with pipeline/config/schema.py or dvc.yaml"
        pytest.fail(f"{stale}; run {FIX}\n{shown}")


def test_every_key_of_every_section_appears_with_its_default_and_description():
    rows = table_rows(reference.render())
    defaults = Params().model_dump(mode="json")
    for section, section_field in Params.model_fields.items():
        for key, field in section_field.annotation.model_fields.items():
            name = f"{section}.{key}"
            assert (f"`{section}`", name) in rows, f"{name} is missing from the reference"
            _, default, _, description = rows[(f"`{section}`", name)]
            shown, expected = read_default(default), defaults[section][key]
            assert shown == expected and type(shown) is type(expected), (name, default)
            assert description == (field.description or ""), name


def test_every_search_dimension_appears_with_its_keys():
    text = reference.render()
    rows = table_rows(text)
    for model in set(DIMENSIONS.values()):
        headings = [h for h, _ in rows if h.split(" ")[0] == model.__name__]
        assert headings, f"sweep.space dimension {model.__name__} is not described"
        for key, field in model.model_fields.items():
            _, default, _, _ = rows[(headings[0], key)]
            if field.is_required():
                assert default == "required", (model.__name__, key)
            else:
                assert read_default(default) == field.default, (model.__name__, key)
    for tag in DIMENSIONS:
        assert f"`type: {tag}`" in text


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -1, 0.0, 2e-4, 1e-5, 1.0, "", "digits", "null", "true", "off", "1",
     "1e-4", "0x10", "a b", "a: b", "#x", "[x]", "a,b", "sqlite:///mlflow.db", "-", ":",
     [], ["color", "1", "a, b"], {}, {"train.lr_g": {"type": "choice", "values": [1, None]}}],
)  # fmt: skip
def test_values_are_written_as_yaml_that_reads_back_as_them(value):
    assert parse_yaml(reference.yaml_text(value)) == value


def test_constraints_are_shown():
    rows = table_rows(reference.render())
    assert rows[("`train`", "train.lr_g")][2] == "> 0, <= 1"
    assert rows[("`tracking`", "tracking.experiment")][2] == "length >= 1"
    assert rows[("`register`", "register.alias")][2].startswith("matches `^[A-Za-z]")


def test_a_schema_change_changes_the_reference():
    """What CI relies on: a new key or default in the schema makes the committed file stale."""
    train = create_model(
        "TrainParams",
        __base__=TrainParams,
        warmup=(int, Field(7, ge=0, description="a new key")),
        steps=(int, Field(123, ge=1)),
    )
    changed = create_model("Params", __base__=Params, train=(train, Field(default_factory=train)))
    rows = table_rows(reference.render(changed))
    assert rows[("`train`", "train.warmup")] == ["int", "`7`", ">= 0", "a new key"]
    assert rows[("`train`", "train.steps")][1] == "`123`"
    assert reference.render(changed) != reference.render()


def test_check_exits_0_on_a_fresh_file_and_1_on_a_stale_or_missing_one(tmp_path, capsys):
    fresh = tmp_path / "fresh.md"
    fresh.write_text(reference.render())
    assert reference.main(["--check", str(fresh)]) == 0
    assert "is up to date" in capsys.readouterr().out

    stale = tmp_path / "stale.md"
    stale.write_text(reference.render().replace("| `2000` |", "| `1000` |", 1))
    assert reference.main(["--check", str(stale)]) == 1
    assert f"out of date; run python -m pipeline.reference > {stale}" in capsys.readouterr().err

    missing = tmp_path / "missing.md"
    assert reference.main(["--check", str(missing)]) == 1
    assert "does not exist; run python -m pipeline.reference >" in capsys.readouterr().err


def test_sections_say_which_dvc_stages_declare_their_keys(tmp_path):
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text(
        "stages:\n"
        "  train: {cmd: x, params: [model, train, ray.num_workers]}\n"
        "  register: {cmd: y, params: [{params.yaml: [tracking]}]}\n"
    )
    text = reference.render(dvc_file=dvc)
    assert "DVC: stage params of `train`; a change re-runs it." in text
    assert "DVC: `ray.num_workers` is a stage param of `train`; changing the other keys" in text
    assert "DVC: stage params of `register`; a change re-runs it." in text
    assert "DVC: no stage declares these keys" in text  # prepare, sweep, ...
    assert "DVC:" not in reference.render(dvc_file=tmp_path / "absent.yaml")
