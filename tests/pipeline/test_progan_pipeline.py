"""Progressive growing through the stages: a progan run on digits grows from 4 px to the
prepared 16 px, is evaluated at the final resolution, registered with a generator that holds
only what sampling at 16 px needs, and samples through `ganpipe.load`; a run that ends before
the final resolution is faded in is refused by evaluate with the fix."""

import json
from pathlib import Path

import pytest
import ray

import ganpipe
from gan.export import read_generator_info
from pipeline.artifacts import GENERATORS
from pipeline.checkpoint import CheckpointError
from pipeline.config import validate_params
from pipeline.evaluate import evaluate
from pipeline.featurenet import train_featurenet
from pipeline.prepare import prepare
from pipeline.registry import register
from pipeline.train import train

pytestmark = pytest.mark.slow


def progan(root: Path, name: str, steps: int) -> dict:
    return {
        "prepare": {"out_dir": str(root / "prepared")},
        "model": {"family": "progan", "start_resolution": 4, "z_dim": 16, "g_width": 16,
                  "d_width": 16},
        "train": {"steps": steps, "batch_size": 32, "log_every": 20, "checkpoint_every": 40,
                  "stabilise_kimg": 0.4, "fade_kimg": 0.4, "out_dir": str(root / name)},
        "featurenet": {"out_dir": str(root / "featurenet"), "epochs": 3, "min_skill": 0,
                       "metrics_file": str(root / "featurenet.json")},
        "evaluate": {"out_dir": str(root / f"{name}-evaluate"), "num_samples": 200,
                     "kid_subset_size": 100, "metrics_dir": str(root / f"{name}-metrics"),
                     "cache_dir": str(root / "cache")},
        "augment": {"enabled": False},
        "register": {"out_file": str(root / f"{name}-registered.json")},
        "ray": {"num_workers": 1, "cpus_per_worker": 2, "storage_path": str(root / "runs")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("progan")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # 4 px, fade 8, 8, fade 16: 1,600 images; 16 px from step 50 (32 images a step)
    grown = validate_params(progan(root, "grown", 80))
    prepare(grown, progress=False)
    train_featurenet(grown)
    train(grown)
    yield {"root": root, "grown": grown}
    ray.shutdown()


def test_the_grown_generator_is_evaluated_registered_and_served_at_the_final_resolution(world):
    params = world["grown"]
    report = evaluate(params)
    (scores,) = report["candidates"].values()
    assert 0 < scores["fid_domain"] < float("inf")  # 80 tiny steps: mechanics, not quality
    (exported,) = (Path(params.evaluate.out_dir) / GENERATORS).iterdir()
    info = read_generator_info(exported)
    assert info["spec"]["family"] == "progan" and info["spec"]["resolution"] == 16
    summary = register(params)
    g = ganpipe.load(summary["model_uri"], params.tracking.uri)
    images = g.sample(6, seed=1)
    assert images.shape == (6, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    lower = [k for k in g.generator.state_dict() if "rgb" in k.lower()]
    assert lower and all("16" in k or "final" in k for k in lower), lower  # one toRGB only


def test_a_checkpoint_from_before_the_final_fade_in_ended_is_refused_by_evaluate(world):
    """The run's step-40 checkpoint (Ray keeps it) is mid-fade to 16 px: nothing to score."""
    from pipeline.candidates import generator_from_checkpoint
    from pipeline.shards import read_manifest

    params = world["grown"]
    (state,) = [s for s in Path(params.ray.storage_path).glob("gan-*/checkpoint_*/state.json")
                if json.loads(s.read_text())["step"] == 40]  # fmt: skip
    assert json.loads(state.read_text())["stage"] == {"resolution": 16, "alpha": 0.12, "phase": 3}
    manifest = read_manifest(Path(params.prepare.out_dir))
    with pytest.raises(CheckpointError, match=r"ended growing at 16 px \(alpha 0.120\)"):
        generator_from_checkpoint(state.parent, manifest)


def test_phases_that_do_not_fit_the_run_are_refused_before_training(world):
    with pytest.raises(ValueError, match="1,600 real images before the final resolution"):
        validate_params(progan(world["root"], "x", 30))  # 960 images shown
