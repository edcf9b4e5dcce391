"""Output directories: a stage replaces only what it wrote, never a directory it did not create."""

import json
import re
import shutil

import pytest

from pipeline.artifacts import read_stage_json
from pipeline.config import validate_params
from pipeline.files import (
    OWNER_FILE,
    OutputError,
    replace_entries,
    staging_dir,
    write_json,
)
from pipeline.prepare import prepare
from tests.conftest import tree_digest


def prepare_into(out_dir):
    return prepare(
        validate_params({"prepare": {"out_dir": str(out_dir), "resolution": 8}}), progress=False
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_into(out)
    return out


def test_prepare_refuses_a_directory_it_did_not_create(tmp_path):
    thesis = tmp_path / "some" / "dir" / "thesis.txt"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("four years of work")
    with pytest.raises(OutputError) as info:
        prepare_into(thesis.parent)
    message = str(info.value)
    assert f"prepare.out_dir {thesis.parent}" in message
    assert "thesis.txt" in message and "did not write" in message
    assert thesis.read_text() == "four years of work"
    assert sorted(p.name for p in thesis.parent.iterdir()) == ["thesis.txt"]
    assert [p.name for p in thesis.parent.parent.iterdir()] == ["dir"]  # no staging left


def test_prepare_replaces_its_own_output_an_empty_directory_and_a_pre_marker_output(
    tmp_path, prepared
):
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_into(empty)
    owner = json.loads((empty / OWNER_FILE).read_text())
    assert owner["entries"] == {"manifest.json": "prepare", "test": "prepare", "train": "prepare"}
    prepare_into(empty)  # again: its own output
    legacy = tmp_path / "legacy"
    shutil.copytree(prepared, legacy)
    (legacy / OWNER_FILE).unlink()  # as written before markers: the manifest says what it wrote
    prepare_into(legacy)
    assert (legacy / OWNER_FILE).is_file()


def test_prepare_refuses_its_own_output_once_something_else_is_put_in(tmp_path, prepared):
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    (out / "notes").mkdir()
    (out / "notes" / "thesis.txt").write_text("mine")
    before = tree_digest(out)
    with pytest.raises(OutputError, match=r"holds notes, which the prepare stage did not write"):
        prepare_into(out)
    assert tree_digest(out) == before


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "prepared").write_text("a file")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        prepare_into(tmp_path / "prepared")
    assert (tmp_path / "prepared").read_text() == "a file"


def test_the_cli_reports_it_in_one_line_with_exit_1(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("mine")
    (tmp_path / "params.yaml").write_text("prepare:\n  resolution: 8\n")
    argv = ["prepare", "--params", str(tmp_path / "params.yaml")]
    assert main([*argv, "--set", f"prepare.out_dir={tmp_path / 'mine'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ganpipe prepare: prepare.out_dir") and "thesis.txt" in err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "mine"


def staged(target, **entries):
    """A staging directory beside `target` holding files (str) or directories (dict)."""
    staging = staging_dir(target)
    for name, content in entries.items():
        if isinstance(content, dict):
            (staging / name).mkdir()
            for inner, text in content.items():
                (staging / name / inner).write_text(text)
        else:
            (staging / name).write_text(content)
    return staging


def test_entries_replace_only_their_own_namesakes(tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "holiday.png").write_text("a user's own picture")
    (out / ".gitignore").write_text("/result.json\n")  # DVC's: left alone
    staging = staged(out, **{"result.json": "{}", "samples": {"a.png": "png"}})
    with pytest.raises(OutputError, match="holds samples, which ganpipe did not write there"):
        replace_entries(staging, out)
    assert (out / "samples" / "holiday.png").read_text() == "a user's own picture"
    assert not (out / "result.json").exists()  # nothing moved before the refusal
    shutil.rmtree(staging)

    fresh = tmp_path / "fresh"
    (fresh / "thesis.txt").parent.mkdir()
    (fresh / "thesis.txt").write_text("mine")
    replace_entries(staged(fresh, **{"result.json": "1", "samples": {"a.png": "1"}}), fresh)
    replace_entries(staged(fresh, **{"result.json": "2", "samples": {"b.png": "2"}}), fresh)
    assert (fresh / "result.json").read_text() == "2"
    assert [p.name for p in (fresh / "samples").iterdir()] == ["b.png"]
    assert (fresh / "thesis.txt").read_text() == "mine"  # not a namesake: stays


class StageInputError(RuntimeError):
    """A caller's own error class: what read_stage_json must raise."""


def test_read_stage_json_returns_the_object_a_stage_wrote(tmp_path):
    write_json(tmp_path / "result.json", {"candidates": [{"name": "a"}], "é": 1.5})
    assert read_stage_json(tmp_path / "result.json", "train", StageInputError) == {
        "candidates": [{"name": "a"}],
        "é": 1.5,
    }


@pytest.mark.parametrize(
    "content, wrong",
    [
        (None, r"is missing: run the train stage first \(dvc repro train\)$"),
        (b'{"candidates": [', r"is not valid JSON \(Expecting value: line 1 column 17"),
        (b"{}garbage", r"is not valid JSON \(Extra data"),
        (b'{"name": "\xe9"}', r"is not valid JSON \(.*utf-8"),  # Latin-1, not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, r"is not valid JSON \(maximum recursion depth"),
        (b"[1, 2]", r": expected a JSON object, got a list"),
        (b'"text"', r": expected a JSON object, got a string"),
        (b"null", r": expected a JSON object, got a null"),
        ("dir", r"cannot be read \(Is a directory\)"),
    ],
)
def test_read_stage_json_names_the_file_the_problem_and_the_stage_to_re_run(
    tmp_path, content, wrong
):
    path = tmp_path / "result.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(StageInputError) as info:
        read_stage_json(path, "train", StageInputError)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert re.search(wrong, message), message
    if content is not None:
        assert message.endswith(": re-run the train stage (dvc repro train)"), message
