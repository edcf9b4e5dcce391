"""gan.export: one digest over weights and spec, and a spec read strictly (issue 13, item 2)."""

import json

import pytest
import torch

from gan.export import INFO, WEIGHTS, ExportError, generator_digest, load_generator, save_generator
from gan.models import GeneratorSpec

SPEC = GeneratorSpec("dcgan", 1, 16, 16, 8)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    save_generator(tmp_path / "g", SPEC.build(), SPEC, candidate="a")
    return tmp_path / "g"


def edit_spec(directory, **changes):
    info = json.loads((directory / INFO).read_text())
    info["spec"].update(changes)
    (directory / INFO).write_text(json.dumps(info))


def test_the_digest_covers_weights_and_spec(exported):
    digest = generator_digest(exported)
    load_generator(exported, digest)
    info = (exported / INFO).read_text()
    (exported / INFO).write_text(info.replace('"candidate": "a"', '"candidate": "b"'))
    with pytest.raises(ExportError, match="weights or the spec were replaced or damaged"):
        load_generator(exported, digest)
    assert generator_digest(exported) != digest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dropout": 0.5}, r"unknown spec key\(s\) 'dropout'; a generator spec has family, "),
        ({"width": "8"}, r"spec key 'width' is '8' \(str\), expected int"),
        ({"channels": True}, r"spec key 'channels' is True \(bool\), expected int"),
        ({"z_dim": 16.0}, r"spec key 'z_dim' is 16.0 \(float\), expected int"),
        ({"resolution": 0}, r"spec key 'resolution' is 0, expected 1..65536"),
        ({"family": "vit"}, r"its spec builds no generator \(unknown model family 'vit'"),
        ({"width": 16}, r"generator.safetensors does not fit the spec in generator.json \(Error"),
    ],
)
def test_a_bad_spec_is_an_error_naming_the_key(exported, changes, message):
    edit_spec(exported, **changes)  # the weights still match their sha256 in the JSON
    with pytest.raises(ExportError, match=message):
        load_generator(exported)


def test_a_missing_key_or_a_spec_that_is_not_an_object(exported):
    info = json.loads((exported / INFO).read_text())
    del info["spec"]["family"]
    (exported / INFO).write_text(json.dumps(info))
    with pytest.raises(ExportError, match="spec lacks 'family'"):
        load_generator(exported)
    (exported / INFO).write_text(json.dumps({**info, "spec": [1, 2]}))
    with pytest.raises(ExportError, match="spec is a list, expected a JSON object"):
        load_generator(exported)
    (exported / INFO).write_text("[]")
    with pytest.raises(ExportError, match="holds a list, expected a JSON object"):
        load_generator(exported)
    (exported / WEIGHTS).unlink()
    with pytest.raises(ExportError, match="generator.safetensors is missing"):
        load_generator(exported)
