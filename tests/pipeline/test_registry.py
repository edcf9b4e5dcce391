"""The register stage against a real MLflow registry (sqlite in tmp_path), with real tiny DCGANs
exported by gan.export and an evaluate-stage metrics file written here."""

import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from gan.export import generator_digest, save_generator
from gan.models import GeneratorSpec
from pipeline.artifacts import EVALUATE_REPORT
from pipeline.cluster import free_port
from pipeline.config import validate_params
from pipeline.errors import RegistryError
from pipeline.registry import (
    GENERATORS,
    best_candidate,
    logged_model_id,
    register,
)
from pipeline.tracking import TAG_VALUE_LIMIT, json_tag, mlflow_at

SPEC = GeneratorSpec("dcgan", 1, 16, 16, 8)
CONDITIONAL_SPEC = GeneratorSpec("dcgan", 1, 16, 16, 8, num_classes=10)
RUN_PARAMS = {"model": {"family": "dcgan", "z_dim": 16, "g_width": 8}, "train": {"steps": 10}}


def protocol_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def evaluation(
    root: Path,
    candidates: dict[str, dict],
    db: Path,
    protocol: str = "p1",
    spec: GeneratorSpec = SPEC,
    **register,
):
    """Params whose evaluate outputs (report.json and exported generators, in `root`) hold
    `candidates` ({name: scores}); each generator's weights are seeded by its name, so the
    same name gives the same weights. The tracking store is the sqlite file `db`."""
    out = root / "evaluate"
    for name, scores in candidates.items():
        generator = spec.build()
        torch.manual_seed(zlib.crc32(name.encode()))
        with torch.no_grad():  # fresh init: conditional BatchNorm would ignore the class
            for p in generator.parameters():
                p.normal_(0, 0.2)
        save_generator(
            out / GENERATORS / name, generator, spec, candidate=name,
            mlflow_run_id=scores.get("mlflow_run_id"), dataset_hash="d" * 64,
            class_names=[str(k) for k in range(spec.num_classes)], which="ema", steps=10,
            params=RUN_PARAMS,
        )  # fmt: skip
    report = {
        "protocol": {
            "id": protocol_id(protocol + "+inception"),  # the registry compares `ids` only
            "ids": {"domain": protocol_id(protocol)},
            "feature_extractors": {"domain": protocol},
            "num_samples": 100,
            "split": "train",
            "generator": "ema",
            "seed": 0,
            "torch_fidelity": "0.4.0",
            "dataset_hash": "d" * 64,
        },  # fmt: skip
        "sanity": {"fid_floor_domain": 1.2, "fid_ceiling_domain": 250.0},
        "candidates": {
            name: {"diverged": False, "steps": 10, "mlflow_run_id": None, **scores}
            for name, scores in candidates.items()
        },
        "inception": {"status": "skipped", "reason": "evaluate.inception is false"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / EVALUATE_REPORT).write_text(json.dumps(report))
    return validate_params({
        "evaluate": {"out_dir": str(out)},
        "register": {"out_file": str(root / "registered.json"), **register},
        "tracking": {"uri": f"sqlite:///{db}"},
    })  # fmt: skip


def test_best_candidate_follows_the_metric_direction_and_skips_diverged():
    candidates = {
        "a": {"diverged": False, "fid_domain": 20.0, "is_domain": 3.0},
        "b": {"diverged": True, "fid_domain": 1.0, "is_domain": 9.0},
        "c": {"diverged": False, "fid_domain": 10.0, "is_domain": 2.0},
        "d": {"diverged": False, "fid_domain": float("nan"), "is_domain": float("nan")},
    }
    assert best_candidate(candidates, "fid_domain")[0] == "c"  # lower is better
    assert best_candidate(candidates, "is_domain")[0] == "a"  # higher is better
    with pytest.raises(RegistryError, match=r"'kid_domain' is in no .*fid_domain, is_domain"):
        best_candidate(candidates, "kid_domain")
    with pytest.raises(RegistryError, match="no candidate can be registered"):
        best_candidate({"b": candidates["b"], "d": candidates["d"]}, "fid_domain")


def test_inputs_the_evaluate_stage_did_not_write_are_clear_errors(tmp_path):
    params = validate_params({"evaluate": {"out_dir": str(tmp_path / "none")}})
    with pytest.raises(RegistryError, match="none/report.json is missing: run the evaluate stage"):
        register(params)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / EVALUATE_REPORT).write_text(json.dumps({"candidates": {}}))
    with pytest.raises(RegistryError, match="lacks protocol: not written by the evaluate"):
        register(params)


def test_long_json_tags_stay_valid_json_under_the_limit():
    assert json.loads(json_tag({"b": 1, "a": [2]})) == {"a": [2], "b": 1}
    long = json_tag({"x": "y" * TAG_VALUE_LIMIT})
    assert len(long) <= TAG_VALUE_LIMIT and "generator.json" in json.loads(long)["omitted"]


def test_register_logs_a_pickle_free_model_with_its_identity_tags(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    training_run = client.create_run(client.create_experiment("training")).info.run_id
    client.set_terminated(training_run)
    params = evaluation(
        tmp_path,
        {
            "a": {"fid_domain": 20.0, "is_domain": 2.0},
            "b": {"fid_domain": 5.0, "is_domain": 9.0, "diverged": True},
            "c": {
                "fid_domain": 10.0, "is_domain": 3.0, "mlflow_run_id": training_run,
                "generator_choice": {"rule": "best", "gap_flagged": True, "gap": "ema 9x worse"},
            },
        },
        db,
        metric="is_domain",
    )  # fmt: skip
    tracking_before = mlflow.get_tracking_uri()
    summary = register(params)
    # MLflow's global tracking URI (and the variable that carries it) are left as they were.
    assert mlflow.get_tracking_uri() == tracking_before
    assert "MLFLOW_TRACKING_URI" not in os.environ

    assert (summary["candidate"], summary["version"], summary["value"]) == ("c", 1, 3.0)
    assert summary["aliases"] == ["challenger", "champion"] and summary["promoted"]
    assert json.loads(Path(params.register.out_file).read_text()) == summary
    version = client.get_model_version(params.register.model_name, "1")
    assert version.run_id == training_run  # logged into the candidate's training run...
    assert client.get_run(training_run).info.status == "FINISHED"  # ...left as it was
    tags = version.tags
    assert tags["ganpipe.weights_sha256"] == summary["weights_sha256"]
    assert tags["ganpipe.candidate"] == "c" and tags["ganpipe.primary_metric"] == "is_domain"
    assert tags["ganpipe.protocol_id"] == protocol_id("p1")
    assert json.loads(tags["ganpipe.protocol"])["num_samples"] == 100
    assert json.loads(tags["ganpipe.params"]) == RUN_PARAMS
    assert tags["ganpipe.dataset_hash"] == "d" * 64 and tags["ganpipe.git_commit"]
    assert float(tags["ganpipe.metric.fid_domain"]) == 10.0
    assert float(tags["ganpipe.metric.is_domain"]) == 3.0
    # which of the run's generators it is, and how the other one compared
    assert tags["ganpipe.generator"] == summary["generator"] == "ema"
    assert tags["ganpipe.generator_gap"] == "ema 9x worse"
    assert tags["ganpipe.family"] == "dcgan" and tags["ganpipe.task"] == "unconditional"
    # what it is, in one paragraph (the Models page shows it first)
    assert version.description == (
        "WARNING: the two generators differ a lot. dcgan unconditional generator (EMA weights) "
        "of training run c, data dddddddddddd: is_domain 3 (higher is better). Evaluate scored "
        "both the EMA and the raw generator (rule: best); ema 9x worse."
    )

    with mlflow_at(f"sqlite:///{db}"):
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                "models:/ganpipe-generator/1", dst_path=str(tmp_path / "model")
            )
        )
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    # Data only: no pickle and no code; MLflow loads it with the installed ganpipe package.
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".py"))], files
    assert {"MLmodel", "data/c/generator.safetensors", "data/c/generator.json"} <= files
    flavor = Model.load(model_dir).flavors["python_function"]
    assert flavor["loader_module"] == "pipeline.generator_model" and not flavor.get("code")
    digest = generator_digest(Path(params.evaluate.out_dir) / GENERATORS / "c")
    assert tags["ganpipe.generator_digest"] == summary["generator_digest"] == digest
    model_id = logged_model_id(version)  # the logged model
    assert model_id == version.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert logged.tags["ganpipe.generator_digest"] == digest
    # its evaluation figures, at the training step, through the training run
    figures = {m.key: (m.value, m.step, m.run_id) for m in logged.metrics}
    assert figures == {"eval.fid_domain": (10.0, 10, training_run),
                       "eval.is_domain": (3.0, 10, training_run)}  # fmt: skip

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with mlflow_at(f"sqlite:///{db}"):
        model = mlflow.pyfunc.load_model("models:/ganpipe-generator@champion")
    two_requests = pd.DataFrame([{"num_images": 2, "seed": 0}, {"num_images": 3, "seed": 1}])
    images = model.predict(two_requests)
    assert images.shape == (5, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images, model.predict(two_requests))  # seeded
    np.testing.assert_array_equal(images[:2], model.predict(two_requests[:1]))
    assert not np.array_equal(images[:2], images[2:4])  # another seed, other images
    with pytest.raises(MlflowException, match="between 1 and 1024, got 2000"):
        model.predict(pd.DataFrame([{"num_images": 2000, "seed": 0}]))
    with pytest.raises(MlflowException, match="unconditional"):
        model.predict(pd.DataFrame([{"num_images": 2, "seed": 0, "label": 3}]))


def test_champion_challenger_aliases(tmp_path):
    db = tmp_path / "mlflow.db"

    def round_(name: str, candidates: dict, protocol: str = "p1") -> dict:
        return register(evaluation(tmp_path / name, candidates, db, protocol))

    first = round_("1", {"a": {"fid_domain": 10.0}})
    assert first["aliases"] == ["challenger", "champion"]
    assert first["message"] == "promoted to champion: there was no champion"
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(client.get_model_version("ganpipe-generator", "1").run_id)
    assert client.get_experiment(run.info.experiment_id).name == "ganpipe"  # a new run

    worse = round_("2", {"b": {"fid_domain": 12.0}})
    assert (worse["version"], worse["aliases"], worse["promoted"]) == (2, ["challenger"], False)
    assert "not better than 10 of champion version 1" in worse["message"]

    better = round_("3", {"c": {"fid_domain": 8.0}})
    assert (better["version"], better["aliases"]) == (3, ["challenger", "champion"])
    assert better["message"] == "promoted to champion: fid_domain 8 < 10 of version 1"

    other_protocol = round_("4", {"d": {"fid_domain": 1.0}}, protocol="p2")
    assert (other_protocol["version"], other_protocol["aliases"]) == (4, ["challenger"])
    assert "not comparable" in other_protocol["message"]
    assert (
        "set_registered_model_alias('ganpipe-generator', 'champion', 4)"
        in (other_protocol["message"])
    )

    again = round_("5", {"c": {"fid_domain": 11.0}})  # version 3's weights, scored again
    assert (again["version"], again["aliases"]) == (3, ["challenger", "champion"])
    assert again["message"].startswith("already registered as version 3; ")
    versions = client.search_model_versions("name = 'ganpipe-generator'")
    assert len(versions) == 4

    # the Models view ranks the versions' logged models by their latest evaluation figures
    version_of = {logged_model_id(v): int(v.version) for v in versions}
    experiments = sorted({client.get_logged_model(m).experiment_id for m in version_of})
    ranked = client.search_logged_models(
        experiments, order_by=[{"field_name": "metrics.eval.fid_domain", "ascending": True}]
    )
    assert [version_of[m.model_id] for m in ranked] == [4, 1, 3, 2]  # 1.0, 10.0, 11.0, 12.0
    history = [m.value for m in client.get_logged_model(ranked[2].model_id).metrics]
    assert history == [8.0, 11.0]  # version 3 scored again: its latest score ranks it
    below_ten = client.search_logged_models(
        experiments, filter_string="metrics.`eval.fid_domain` < 10"
    )
    # MLflow 3.18 (constraints.txt): a filter reads the latest value too (3.17 matched any
    # logged one: version 3's old 8.0)
    assert sorted(version_of[m.model_id] for m in below_ten) == [4]


def test_unusable_registry_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    params = evaluation(tmp_path, {"a": {"fid_domain": 10.0}}, db)
    out_file = Path(params.register.out_file)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    start = time.perf_counter()
    with pytest.raises(RegistryError, match=f"{dead} is unreachable"):
        register(params)
    assert time.perf_counter() - start < 10
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(RegistryError, match="cannot hold an MLflow Model Registry"):
        register(params)
    assert not out_file.exists() and not db.exists()

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the registry is back: the same candidate
    assert register(params)["candidate"] == "a" and out_file.is_file()
