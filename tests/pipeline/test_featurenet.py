"""The featurenet stage: a real classifier of the prepared data, saved pickle-free."""

import json

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_params, validate_params
from pipeline.errors import EvaluationError
from pipeline.featurenet import (
    INFO,
    WEIGHTS,
    load_featurenet,
    predict,
    read_featurenet_info,
    skill,
    train_featurenet,
    trust,
)
from pipeline.files import OutputError
from pipeline.prepare import prepare
from tests.conftest import tree_digest
from tests.pipeline.test_evaluate import save_candidates


def digits_params(tmp_path, **featurenet):
    return validate_params(
        {
            "prepare": {"out_dir": str(tmp_path / "prepared"), "resolution": 8},
            "featurenet": {
                "out_dir": str(tmp_path / "featurenet"),
                "metrics_file": str(tmp_path / "metrics" / "featurenet.json"),
                **featurenet,
            },
        }
    )


def test_digits_featurenet_is_accurate_and_reloads_to_the_same_predictions(tmp_path, capsys):
    params = digits_params(tmp_path, epochs=8)
    prepare(params)
    capsys.readouterr()
    report = train_featurenet(params)
    assert report["test_accuracy"] >= 0.95
    metrics = json.loads((tmp_path / "metrics" / "featurenet.json").read_text())  # DVC's
    assert metrics == {"accuracy": float(f"{report['test_accuracy']:.4g}"),
                       "seconds": float(f"{report['train_seconds']:.4g}")}  # fmt: skip
    metrics = read_featurenet_info(tmp_path / "featurenet")  # the figures and the description
    assert metrics["test_accuracy"] == report["test_accuracy"]
    assert metrics["num_classes"] == 10
    # digits' test split: the largest class holds 42 of 359 images
    assert metrics["chance_accuracy"] == pytest.approx(42 / 359)
    expected_skill = (report["test_accuracy"] - metrics["chance_accuracy"]) / (
        1 - metrics["chance_accuracy"]
    )
    assert metrics["test_skill"] == pytest.approx(expected_skill)
    assert metrics["domain_trust"] == "high"
    # it trains visibly: one line per epoch with loss and accuracy, then the verdict
    err = capsys.readouterr().err.splitlines()
    epochs = [line for line in err if line.startswith("featurenet epoch ")]
    assert len(epochs) == 8 and epochs[-1].startswith("featurenet epoch 8/8: loss ")
    assert "train accuracy" in epochs[-1]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in epochs]
    assert losses[-1] < losses[0] / 3
    assert any("skill" in line and "trust high" in line for line in err)

    net, info = load_featurenet(tmp_path / "featurenet")
    assert info["dataset_hash"] and info["resolution"] == 8 and info["channels"] == 1
    features, logits = net(torch.zeros(3, 1, 8, 8))
    assert features.shape == (3, params.featurenet.feature_dim) and logits.shape == (3, 10)
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    assert predict(net, images).shape == (4,)


def test_too_low_accuracy_fails_and_keeps_the_previous_featurenet(tmp_path):
    params = digits_params(tmp_path, epochs=1, min_skill=0.0)
    prepare(params)
    train_featurenet(params)
    before = tree_digest(tmp_path / "featurenet")
    strict = digits_params(tmp_path, epochs=1, width=4, min_skill=0.0, min_accuracy=1.0)
    with pytest.raises(EvaluationError, match="below featurenet.min_accuracy 1.0"):
        train_featurenet(strict)
    assert tree_digest(tmp_path / "featurenet") == before
    assert not list(tmp_path.glob(".featurenet*")), "no staging directory is left behind"
    unskilled = digits_params(tmp_path, epochs=1, width=4, min_skill=1.0)
    with pytest.raises(EvaluationError, match=r"skill -?0\.\d+ is below featurenet.min_skill 1.0"):
        train_featurenet(unskilled)
    assert tree_digest(tmp_path / "featurenet") == before


def test_the_accuracy_floor_is_relative_to_chance():
    balanced = np.repeat(np.arange(10), 100)
    # a small CNN's accuracy on a CIFAR-10 folder: far from 0.95, far above chance
    chance, cifar_skill = skill(0.666, balanced)
    assert chance == 0.1 and cifar_skill == pytest.approx(0.629, abs=1e-3)
    assert cifar_skill >= validate_params({}).featurenet.min_skill
    assert trust(cifar_skill)[0] == "moderate"
    assert trust(0.99)[0] == "high" and trust(0.2)[0] == "low"
    # two classes, 90% of one: 0.9 accuracy is no skill at all
    assert skill(0.9, np.array([0] * 90 + [1] * 10)) == pytest.approx((0.9, 0.0))


def test_tampered_weights_are_refused(tmp_path):
    params = digits_params(tmp_path, epochs=1, min_skill=0.0)
    prepare(params)
    train_featurenet(params)
    (tmp_path / "featurenet" / WEIGHTS).write_bytes(b"not the weights")
    with pytest.raises(EvaluationError, match="does not match its sha256"):
        load_featurenet(tmp_path / "featurenet")
    (tmp_path / "featurenet" / INFO).unlink()
    with pytest.raises(EvaluationError, match="run the featurenet stage"):
        load_featurenet(tmp_path / "featurenet")


def test_unlabeled_data_has_no_featurenet_and_evaluation_says_what_to_use(
    tmp_path, image_folder, capsys
):
    flat = image_folder / "cat"  # one folder of images read without labels
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"prepare: {{source: imagefolder, image_dir: {flat}, image_labels: none, "
        f"test_fraction: 0.3, resolution: 8, out_dir: {tmp_path / 'prepared'}}}\n"
        f"featurenet: {{out_dir: {tmp_path / 'fn'}, metrics_file: {tmp_path / 'fn.json'}}}\n"
        f"train: {{out_dir: {tmp_path / 'train'}}}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
    )
    assert main(["prepare", "--params", str(params_file)]) == 0
    assert main(["featurenet", "--params", str(params_file)]) == 0
    assert "featurenet: none (the prepared data" in capsys.readouterr().out
    info = read_featurenet_info(tmp_path / "fn")
    assert info["available"] is False and "unlabeled" in info["reason"]
    assert json.loads((tmp_path / "fn.json").read_text()) == {}  # no figures to compare
    with pytest.raises(EvaluationError, match="there is no featurenet"):
        load_featurenet(tmp_path / "fn")
    params = load_params(params_file)
    save_candidates(params, [("plain", {}, 0)])
    assert main(["evaluate", "--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "nothing to score with" in err and "set evaluate.inception: true" in err


def test_an_out_dir_it_did_not_create_is_refused_before_training(tmp_path, capsys):
    params = digits_params(tmp_path, out_dir=str(tmp_path / "mine"))
    prepare(params, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"featurenet.out_dir .*mine.* holds thesis.txt"):
        train_featurenet(params)
    assert "featurenet epoch" not in capsys.readouterr().err  # refused before any work
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.txt"]
    into_prepared = digits_params(tmp_path, out_dir=str(tmp_path / "prepared"))
    with pytest.raises(OutputError, match="written by the prepare stage"):
        train_featurenet(into_prepared)
    assert (tmp_path / "prepared" / "manifest.json").is_file()
