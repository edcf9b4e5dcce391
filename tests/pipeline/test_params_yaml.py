"""params.yaml is read with DVC's own parser, the way DVC reads it; alias bombs are refused."""

import time

import pytest
import yaml
from dvc.fs import LocalFileSystem
from dvc.utils.serialize import YAMLFileCorruptedError, load_path
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.params_yaml import ALIAS_BUDGET, YAMLInputError, dump_yaml, parse_yaml


def dvc_reads(tmp_path, text: str):
    """What DVC makes of a params file (the loader `dvc params diff` and `dvc repro` use)."""
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return load_path(str(path), LocalFileSystem())


@pytest.mark.parametrize(
    "text",
    [
        "train:\n  steps: 010\n",  # 10 in YAML 1.2 (8 in YAML 1.1)
        "train:\n  time: 1:30\n",  # a string in YAML 1.2 (90 in YAML 1.1)
        "a: 2e-4\nb: 1e-4\nc: 2E3\nd: 1.0e5\ne: .5\nf: -3\ng: 1_000\nh: '1e-4'\n",
        "a: null\nb: ~\nc:\nd: Null\n",
        "a: yes\nb: no\nc: on\nd: off\ne: true\nf: False\ng: Y\n",
        "a: [1, 2.5, x, null, true]\nb:\n  - color\n  - cutout\nc: []\nd: {}\n",
        "a: 0o17\nb: 0x1f\nc: .inf\nd: -.Inf\ne: 2001-12-14\n",
        "lr: &lr 2e-4\ntrain:\n  lr_g: *lr\n  lr_d: *lr\n",
        "base: &base {steps: 5, loss: hinge}\ntrain:\n  <<: *base\n  steps: 7\n",
        "",
    ],
)
def test_values_read_exactly_as_dvc_reads_them(tmp_path, text):
    ours = parse_yaml(text)
    assert (ours or {}) == dvc_reads(tmp_path, text)  # DVC turns an empty file into {}


def test_the_reported_differences_from_dvc_are_gone():
    assert parse_yaml("steps: 010") == {"steps": 10}
    assert parse_yaml("t: 1:30") == {"t": "1:30"}


def test_a_duplicated_key_is_an_error_as_in_dvc(tmp_path):
    text = "train:\n  steps: 10\n  lr_g: 1e-4\n  steps: 20\n"
    with pytest.raises(YAMLFileCorruptedError):
        dvc_reads(tmp_path, text)
    with pytest.raises(YAMLInputError, match=r"line 4.*duplicate key \"steps\""):
        parse_yaml(text)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="019eE.:+-_xo ntrufalsyNTF~", min_size=1, max_size=6))
def test_any_short_scalar_reads_as_dvc_reads_it(scalar):
    # The same parser: either both read the same value or both refuse it (DVC with a bare
    # ValueError for some, e.g. `._`, which ruamel.yaml resolves as a float it cannot convert).
    from dvc.utils.serialize import parse_yaml as dvc_parse_yaml

    text = f"k: {scalar}\n"
    try:
        expected = dvc_parse_yaml(text, "params.yaml")
    except (YAMLFileCorruptedError, ValueError):
        with pytest.raises(YAMLInputError):
            parse_yaml(text)
        return
    assert parse_yaml(text) == expected


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\ntrain:\n  typo: *a{levels - 1}\n"


def flow_alias_bomb(levels: int = 7) -> str:
    """The same in one line of flow style (a `--set` value)."""
    items = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_an_alias_bomb_is_refused_quickly_with_a_short_message():
    text = alias_bomb()  # written out: 9^9 strings, over a billion
    start = time.perf_counter()
    with pytest.raises(YAMLInputError, match="aliases .* expand") as caught:
        parse_yaml(text)
    assert time.perf_counter() - start < 1.0
    assert len(str(caught.value)) < 400
    with pytest.raises(YAMLInputError, match="aliases .* expand"):
        parse_yaml(flow_alias_bomb())


def test_a_few_aliases_are_fine():
    assert parse_yaml(alias_bomb(levels=3))["train"]["typo"][0][0] == ["lol"] * 9  # 729 strings
    value = "x" * (ALIAS_BUDGET // 2)
    assert parse_yaml(f"a: &v {value}\nb: *v\n")["b"] == value
    with pytest.raises(YAMLInputError, match="aliases .* expand"):
        parse_yaml(f"a: &v {value}\nb: *v\nc: *v\nd: *v\n")


def test_a_self_referring_alias_is_refused():
    with pytest.raises(YAMLInputError, match="refers to itself"):
        parse_yaml("a: &a [1, *a]\n")


def test_deep_nesting_is_refused_not_a_recursion_traceback():
    with pytest.raises(YAMLInputError, match="nested"):
        parse_yaml("a: " + "[" * 1_000 + "]" * 1_000)  # RecursionError in the parser itself


@pytest.mark.parametrize("text", ["a: 2001-13-45", "a: !!int x", "a: " + "9" * 10_000])
def test_values_python_cannot_hold_are_yaml_errors_not_tracebacks(text):
    with pytest.raises(YAMLInputError, match="not valid YAML"):
        parse_yaml(text)


def test_syntax_errors_name_the_line_and_stay_short():
    with pytest.raises(YAMLInputError, match="line 2") as caught:
        parse_yaml("a: 1\n\tb: " + "x" * 1_000_000 + "\n")
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "value", ["1e5", "1e-4", "0o17", "off", "on", "yes", "No", "1:30", "010", "null", "", "hinge"]
)
def test_dumped_strings_read_back_as_strings_in_yaml_1_2_and_1_1(value):
    text = dump_yaml({"k": value, "n": 1e-4, "big": 1e20, "none": None, "flag": True})
    expected = {"k": value, "n": 1e-4, "big": 1e20, "none": None, "flag": True}
    assert parse_yaml(text) == expected  # DVC and ganpipe
    assert yaml.safe_load(text) == expected  # and a YAML 1.1 reader
