"""The augment stage: the featurenet recipe on k real images per class, alone, with classical
augmentation and with each candidate's synthetic images, over seeds, at equal steps; its
report, metrics, plot and MLflow records; and register ranking by the augmentation gain."""

import csv
import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from gan.models import GeneratorSpec
from pipeline.artifacts import candidate_record
from pipeline.augment import augment, classical, shot_settings, subset, synthetic_set
from pipeline.config import validate_params
from pipeline.featurenet import FeatureNet, train_featurenet
from pipeline.prepare import prepare
from pipeline.registry import register
from tests.pipeline.test_registry import CONDITIONAL_SPEC, evaluation

SMALL = {"shots": [5, 20], "ratios": [1, 3], "seeds": 2, "epochs": 1, "min_steps": 20,
         "min_confidence": 0.5}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Digits prepared with a featurenet; a conditional and an unconditional candidate (random
    weights), exported as the evaluate stage does, each with an MLflow run."""
    root = tmp_path_factory.mktemp("augment")
    db = root / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("ganpipe")
    runs = {n: client.create_run(experiment).info.run_id for n in ("ca", "u")}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        evaluation(root, {"ca": {"fid_domain": 1.0, "mlflow_run_id": runs["ca"]}}, db,
                   spec=CONDITIONAL_SPEC)  # fmt: skip
        params = evaluation(root, {"u": {"fid_domain": 1.0, "mlflow_run_id": runs["u"]}}, db)
    path = root / "evaluate" / "report.json"  # each call wrote its own: all three candidates
    evaluated = json.loads(path.read_text())
    evaluated["candidates"]["ca"] = evaluated["candidates"]["u"] | {"mlflow_run_id": runs["ca"]}
    path.write_text(json.dumps(evaluated))
    (root / "train").mkdir()
    (root / "train" / "result.json").write_text(json.dumps({
        "candidates": [candidate_record(n, runs[n], 10) for n in ("ca", "u")]
    }))  # fmt: skip
    tree = {
        "prepare": {"out_dir": str(root / "prepared")},
        "featurenet": {"out_dir": str(root / "featurenet"), "epochs": 4, "min_skill": 0,
                       "metrics_file": str(root / "featurenet.json"), "width": 8},
        "train": {"out_dir": str(root / "train")},
        "evaluate": {"out_dir": str(root / "evaluate")},
        "augment": SMALL | {"out_dir": str(root / "augment"),
                            "metrics_dir": str(root / "metrics")},
        "register": {"out_file": str(root / "registered.json"), "metric": "augment_gain"},
        "tracking": {"uri": f"sqlite:///{db}"},
    }  # fmt: skip
    params = validate_params(tree)
    prepare(params, progress=False)
    train_featurenet(params)
    return {"root": root, "tree": tree, "params": params, "client": client, "runs": runs,
            "report": augment(params)}  # fmt: skip


def test_subsets_are_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 4, 7])
    rows = subset(labels, 5, seed=1)
    assert np.bincount(labels[rows]).tolist() == [5, 4, 5]  # a class smaller than k: all of it
    assert subset(labels, 5, seed=1).tolist() == rows.tolist()
    assert subset(labels, 5, seed=2).tolist() != rows.tolist()
    assert len(subset(labels, None, seed=0)) == 21


def testshot_settings_at_or_above_the_largest_class_are_all_and_steps_are_equal_per_k():
    labels = np.repeat(np.arange(10), 144)
    params = validate_params({"augment": {"shots": [10, 144, "all", 500], "ratios": [1, 4]}})
    shots = shot_settings(params, labels)
    assert list(shots) == ["k10", "all"]  # 144, all and 500 are the whole split
    assert shots["all"] == {"per_class": "all", "real_images": 1440, "steps": 5 * 57}
    assert shots["k10"]["steps"] == 100  # 5 passes over 500 images: 20 steps; min_steps 100


def test_classical_augmentation_flips_only_when_asked():
    x = torch.linspace(-1, 1, 4 * 8 * 8).reshape(4, 1, 8, 8)
    flipped = classical(("flip",))(x, torch.Generator().manual_seed(0))
    assert any(
        torch.equal(f, o.flip(2)) and not torch.equal(f, o) for f, o in zip(flipped, x, strict=True)
    )
    assert torch.equal(classical(())(x, torch.Generator()), x)


def test_synthetic_sets_fill_each_class_quota():
    spec = GeneratorSpec("dcgan", 1, 16, 8, 8, num_classes=3)
    images, labels, stats = synthetic_set(spec.build().eval(), spec, np.array([2, 0, 5]), 0)
    assert images.shape == (7, 16, 16, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [2, 0, 5] and stats["short"] == 0
    plain = GeneratorSpec("dcgan", 1, 16, 8, 8)
    net = FeatureNet(1, 3, width=4).eval()  # untrained: its softmax is rarely above 0.9
    _, labels, stats = synthetic_set(plain.build().eval(), plain, np.array([3, 3, 3]), 0, net, 0.9)
    assert stats["kept"] == len(labels) == 9 - stats["short"] and stats["drawn"] >= 1024
    images, labels, stats = synthetic_set(plain.build().eval(), plain, np.zeros(3, int), 0, net)
    assert images.shape == (0, 16, 16, 1) and len(labels) == 0 and stats["drawn"] == 0


@pytest.mark.slow
def test_the_report_has_every_setting_over_the_seeds_at_equal_steps(setup):
    report = setup["report"]
    assert report["enabled"] and set(report["candidates"]) == {"ca", "u"}
    shots = report["shots"]
    assert list(shots) == ["k5", "k20"] and shots["k20"]["real_images"] == 200
    assert shots["k5"]["steps"] == 20  # min_steps
    assert shots["k20"]["steps"] == 20  # 1 pass over 200 + 600 images: 7 steps; min_steps
    for setting in report["baselines"].values():
        for figures in setting.values():
            assert len(figures["runs"]) == 2 and all(0 < r <= 1 for r in figures["runs"])
    for result in report["candidates"].values():
        assert set(result["synthetic"]) == {"1x", "3x"}
        gain = result["gain"]["3x"]["k5"]
        runs = result["synthetic"]["3x"]["k5"]["runs"]
        real = report["baselines"]["real"]["k5"]["runs"]
        assert gain["runs"] == pytest.approx([a - b for a, b in zip(runs, real, strict=True)])
        assert gain["exceeds_spread"] == (abs(gain["mean"]) > gain["std"])
        assert result["augment_gain"] == pytest.approx(
            np.mean([result["gain"]["3x"][k]["mean"] for k in shots])
        )
        cas = result["cas"]
        assert "reason" in cas or (0 <= cas["mean"] <= 1 and len(cas["runs"]) == 2)
    assert report["candidates"]["u"]["cas"]["labels"] == "featurenet pseudo-labels"
    assert report["candidates"]["ca"]["cas"]["labels"] == "conditioning"
    # random generators: their images only dilute 50 real ones
    noise = report["candidates"]["ca"]["synthetic"]["3x"]["k5"]["mean"]
    assert noise < report["baselines"]["real"]["k5"]["mean"]


@pytest.mark.slow
def test_metrics_plot_and_mlflow_records(setup):
    root, report, client = setup["root"], setup["report"], setup["client"]
    metrics = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")}
    assert set(metrics) == {"real", "classic", "c1", "c2"}
    assert metrics["c1"]["accuracy"] == pytest.approx(report["candidates"]["ca"]["accuracy"],
                                                      rel=1e-3)  # fmt: skip
    assert set(metrics["real"]) == {"accuracy", "seconds"}
    with open(root / "augment" / "accuracy.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["shots"] for r in rows] == ["50", "200"]
    assert {"real", "classical", "c1_1x", "c1_3x", "c2_3x"} <= set(rows[0])
    assert (root / "augment" / "accuracy.png").stat().st_size > 1000
    run = client.get_run(setup["runs"]["u"])
    assert run.data.metrics["augment.augment_gain"] == pytest.approx(
        report["candidates"]["u"]["augment_gain"])  # fmt: skip
    assert "augment.k5.3x" in run.data.metrics and "augment.k20.classical" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(setup["runs"]["u"], "augment")}
    assert logged == {"augment/accuracy.png", "augment/report.json"}


@pytest.mark.slow
def test_register_ranks_by_the_augmentation_gain_under_the_augment_protocol(setup):
    report = setup["report"]
    best = max(report["candidates"], key=lambda n: report["candidates"][n]["augment_gain"])
    summary = register(setup["params"])
    assert summary["candidate"] == best and summary["metric"] == "augment_gain"
    assert summary["value"] == pytest.approx(report["candidates"][best]["augment_gain"])
    version = setup["client"].get_model_version(summary["model_name"], summary["version"])
    assert version.tags["ganpipe.protocol_id"] == report["protocol"]["id"]


@pytest.mark.slow
def test_disabled_it_writes_an_empty_report_and_no_metrics(setup, tmp_path):
    tree = setup["tree"] | {"augment": {"enabled": False, "out_dir": str(tmp_path / "a"),
                                        "metrics_dir": str(tmp_path / "m")},
                            "register": {"metric": "fid_domain"}}  # fmt: skip
    report = augment(validate_params(tree))
    assert report == {"enabled": False, "candidates": {}}
    assert list((tmp_path / "m").iterdir()) == []
    assert (tmp_path / "a" / "accuracy.csv").read_text().strip() == "shots"
