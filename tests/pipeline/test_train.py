"""The train stage on real Ray (local, CPU, gloo) with a tiny DCGAN on 8x8 digits."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from gan.ema import refresh_statistics
from gan.sampling import LatentSampler
from pipeline.candidates import generator_from_checkpoint, generator_spec
from pipeline.checkpoint import WEIGHTS, CheckpointError
from pipeline.config import validate_params
from pipeline.prepare import prepare
from pipeline.shards import read_manifest
from pipeline.training.faults import FaultPlan, drill
from pipeline.training.identity import (
    ResumeMismatchError,
    check_same_run,
    run_identity,
    run_name,
)
from pipeline.training.tracker import SAMPLES_KEY, image_steps


def tiny_params(tmp_path, name, **train):
    return validate_params(
        {
            "prepare": {"out_dir": str(tmp_path / "prepared"), "resolution": 8},
            "model": {"g_width": 8, "d_width": 8, "z_dim": 8},
            "train": {
                "steps": 12,
                "batch_size": 16,
                "log_every": 4,
                "checkpoint_every": 4,
                "debug_checks": True,
                "out_dir": str(tmp_path / name / "out"),
                **train,
            },  # fmt: skip
            "ray": {
                "num_workers": 2,
                "max_failures": 1,
                "storage_path": str(tmp_path / name / "runs"),
            },
            "tracking": {"uri": f"sqlite:///{tmp_path / name / 'mlflow.db'}"},
        }
    )


def test_run_names_follow_what_is_trained_not_how_long():
    base = validate_params({})
    longer = validate_params({"train": {"steps": 99999, "log_every": 7}})
    other = validate_params({"train": {"lr_g": 1e-3}})
    assert run_name(base, "data1") == run_name(longer, "data1")
    assert run_name(base, "data1") != run_name(other, "data1")
    assert run_name(base, "data1") != run_name(base, "data2")


def test_resuming_with_another_configuration_shows_the_difference():
    saved = run_identity(validate_params({}), "data1")
    check_same_run(saved, run_identity(validate_params({"train": {"steps": 5}}), "data1"))
    with pytest.raises(ResumeMismatchError, match=r"train.lr_g: checkpoint 0.0002 != now 0.001"):
        check_same_run(saved, run_identity(validate_params({"train": {"lr_g": 1e-3}}), "data1"))


def test_checkpoint_scratch_removes_what_dead_workers_left_and_keeps_live_ones(
    tmp_path, monkeypatch
):
    """Tune kills a stopped trial's workers inside report(), before they clean up."""
    import os
    import subprocess
    import sys
    import tempfile

    from pipeline.training.checkpoints import SCRATCH_PREFIX, checkpoint_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for pid in (gone, str(os.getppid()), "x1"):  # a dead worker, a live one, not ours
        (tmp_path / f"{SCRATCH_PREFIX}{pid}" / "ckpt").mkdir(parents=True)
    (tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}" / "ckpt" / "old").mkdir(parents=True)
    scratch = checkpoint_scratch()
    assert scratch == tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}" / "ckpt"
    assert not scratch.parent.exists()  # this process's last one, replaced
    left = sorted(p.name.removeprefix(SCRATCH_PREFIX) for p in tmp_path.iterdir())
    assert left == sorted([str(os.getppid()), "x1"])


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def prepared(tmp_path):
    prepare(tiny_params(tmp_path, "x"), progress=False)


def final_weights(params):
    (candidate,) = json.loads(Path(params.train.out_dir, "result.json").read_text())["candidates"]
    return load_file(Path(params.train.out_dir, candidate["checkpoint"], WEIGHTS))


def reported_steps(params, result: dict) -> list[int]:
    """The steps of the reports of `result`'s run in MLflow: after a worker died, a run that
    resumed from its last checkpoint has each once; one that restarted from step 0 has the
    steps before the death twice."""
    client = MlflowClient(params.tracking.uri)
    return [m.step for m in client.get_metric_history(result["mlflow_run_id"], "loss_d")]


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_weights_as_an_uninterrupted_run(
    tmp_path, ray_session, prepared
):
    from pipeline.train import train

    # n_critic 2 and batch 64: 11 batches per rank and epoch, so the kill at step 6 (batch 12)
    # and the resume fall in the second epoch, and the run ends in the third
    steady = tiny_params(tmp_path, "steady", n_critic=2, batch_size=64)
    faulty = tiny_params(tmp_path, "faulty", n_critic=2, batch_size=64)
    a = train(steady)
    with drill(FaultPlan(exit_rank=1, exit_at_step=6, marker=str(tmp_path / "died"))):
        b = train(faulty)
    assert (tmp_path / "died").exists()  # the worker really died once
    assert a["steps"] == b["steps"] == 12 and not a["diverged"] and not b["diverged"]
    assert reported_steps(faulty, b) == [4, 8, 12]  # resumed at step 4, not restarted
    weights_a, weights_b = final_weights(steady), final_weights(faulty)
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        if key.startswith(("generator", "discriminator")):
            torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0, msg=key)
    # the averaged generator was saved with BatchNorm statistics of its own weights
    ema_state = {k[len("generator_ema.") :]: v for k, v in weights_b.items()
                 if k.startswith("generator_ema.")}  # fmt: skip
    spec = generator_spec(faulty.model.model_dump(mode="json"), (8, 8, 1), 0)
    ema = spec.build()
    ema.load_state_dict(ema_state)
    refresh_statistics(ema, LatentSampler(spec.z_dim), seed=faulty.train.seed)
    stats = [k for k in ema_state if "running_" in k]
    assert stats and all(torch.equal(ema.state_dict()[k], ema_state[k]) for k in stats)
    # ... not the live generator's
    assert any(not torch.equal(weights_b[f"generator.{k}"], ema_state[k]) for k in stats)
    history = (tmp_path / "faulty" / "out" / "history.csv").read_text().splitlines()
    assert [row.split(",")[-1] for row in history[1:]] == ["4", "8", "12"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'faulty' / 'mlflow.db'}")
    run = client.get_run(b["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ganpipe.dataset_hash"] == b["dataset_hash"]
    assert run.data.tags["ganpipe.num_nodes"] == "1"
    assert run.data.params["train.global_batch_size"] == "128"
    assert "loss_d" in run.data.metrics
    # a grid per checkpoint on the UI's step slider (step 4 from before the kill)
    assert list(image_steps(client, run.info.run_id, SAMPLES_KEY)) == [4, 8, 12]
    assert (tmp_path / "faulty" / "out" / "samples.png").stat().st_size > 0


@pytest.mark.slow
def test_a_diverged_run_keeps_its_last_good_checkpoint_and_a_rerun_resumes_from_it(
    tmp_path, ray_session, prepared
):
    from pipeline.train import train

    one_worker = tiny_params(tmp_path, "nan").model_dump(mode="json")
    one_worker["ray"]["num_workers"] = 1  # the path without a DDP wrapper
    params = validate_params(one_worker)
    with drill(FaultPlan(nan_at_step=6)):
        result = train(params)
    assert result["diverged"] and result["diverged_at_step"] == 6
    saved = json.loads((tmp_path / "nan" / "out" / "result.json").read_text())
    assert saved["diverged_at_step"] == 6
    (candidate,) = json.loads((tmp_path / "nan" / "out" / "result.json").read_text())["candidates"]
    state = tmp_path / "nan" / "out" / candidate["checkpoint"] / "state.json"
    assert json.loads(state.read_text())["step"] == 4
    for tensor in final_weights(params).values():
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all()
    client = MlflowClient(params.tracking.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "diverged at step 6" in run.data.tags["ganpipe.diverged_reason"]

    # The same run trained again without the fault: resumed at step 4 (continued, not
    # restarted: the history and MLflow have step 4 once), finished, not diverged.
    again = train(params)
    assert not again["diverged"] and again["steps"] == 12
    assert again["run_name"] == result["run_name"]
    assert again["mlflow_run_id"] == result["mlflow_run_id"]
    history = (tmp_path / "nan" / "out" / "history.csv").read_text().splitlines()
    assert [row.split(",")[-1] for row in history[1:]] == ["4", "8", "12"]
    logged = [m.step for m in client.get_metric_history(again["mlflow_run_id"], "loss_d")]
    assert logged == [4, 8, 12]
    run = client.get_run(again["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "ganpipe.diverged_at_step" not in run.data.tags


def test_unreachable_tracking_server_fails_fast(tmp_path, prepared, monkeypatch):
    import time

    from pipeline.tracking import TrackingError
    from pipeline.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing there
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is unreachable"):
        train(tiny_params(tmp_path, "offline"))
    assert time.monotonic() - start < 10


def test_a_train_split_smaller_than_one_batch_per_worker_is_refused_before_ray_starts(
    tmp_path, prepared
):
    from pipeline.data import DataError
    from pipeline.train import train

    rows = json.loads((tmp_path / "prepared" / "manifest.json").read_text())["splits"]["train"]
    params = tiny_params(tmp_path, "big-batch", batch_size=rows["rows"])  # 2 workers: half each
    with pytest.raises(
        DataError, match=rf"has {rows['rows']} images: too few for 2 worker\(s\) x "
    ):
        train(params)
    assert not (tmp_path / "big-batch" / "mlflow.db").exists()  # no MLflow run was opened
    assert not (tmp_path / "big-batch" / "runs").exists()


def _fake_checkpoint(directory: Path, identity: dict, step: int) -> Path:
    """A real checkpoint of tiny networks with the run identity and step given."""
    from gan.models import build_discriminator, build_generator
    from pipeline.checkpoint import TrainingState, save_checkpoint

    g = build_generator("dcgan", channels=1, resolution=8, z_dim=4, width=4)
    d = build_discriminator("dcgan", channels=1, resolution=8, width=4)
    ema = build_generator("dcgan", channels=1, resolution=8, z_dim=4, width=4)
    modules = {"generator": g, "generator_ema": ema, "discriminator": d}
    optimizers = {
        "opt_g": torch.optim.Adam(g.parameters()),
        "opt_d": torch.optim.Adam(d.parameters()),
    }
    return save_checkpoint(directory, modules, optimizers, TrainingState(step, 0, 0, identity, "x"))


def test_resuming_a_run_trained_differently_or_damaged_is_refused_before_ray_starts(
    tmp_path, prepared
):
    from pipeline.checkpoint import STATE, CheckpointError
    from pipeline.train import train

    params = tiny_params(tmp_path, "clash")
    dataset = json.loads((tmp_path / "prepared" / "manifest.json").read_text())["dataset_hash"]
    run = tmp_path / "clash" / "runs" / run_name(params, dataset)
    fake = _fake_checkpoint(
        run / "checkpoint_2026-01-01_00-00-00.000000", run_identity(params, "not-this-dataset"), 4
    )
    with pytest.raises(ResumeMismatchError, match="dataset: checkpoint 'not-this-dataset'"):
        train(params)
    # a truncated state.json was a JSONDecodeError: now the file and the way out are named
    (fake / STATE).write_text((fake / STATE).read_text()[:100])
    with pytest.raises(CheckpointError, match=rf"{fake / STATE} is damaged.*delete the run's"):
        train(params)
    # a checkpoint past train.steps: not "finished after 400 steps" for a 300-step request
    _fake_checkpoint(
        run / "checkpoint_2026-01-02_00-00-00.000000", run_identity(params, dataset), 40
    )
    with pytest.raises(
        ResumeMismatchError,
        match=r"train.steps is 12, but this run's checkpoint .* is at step 40.*Set train.steps to "
        r"40 or more.*or delete .*runs/gan-dcgan-\w+ to train a new 12-step run",
    ):
        train(params)


@pytest.mark.slow
def test_a_finished_run_is_never_reopened(tmp_path, ray_session, prepared):
    """With runs/ gone a new run of the same configuration reopened the MLflow run behind a
    registered version (FINISHED -> KILLED -> FINISHED, metrics duplicated, samples
    overwritten)."""
    import shutil

    from pipeline.checkpoint import WEIGHTS
    from pipeline.train import train

    tree = tiny_params(tmp_path, "prov", steps=8).model_dump(mode="json")
    tree["ray"]["num_workers"] = 1
    params = validate_params(tree)
    longer = validate_params({**tree, "train": {**tree["train"], "steps": 12}})
    out, runs = Path(params.train.out_dir), Path(params.ray.storage_path)
    client = MlflowClient(params.tracking.uri)

    def provenance(run_id):
        run = client.get_run(run_id)
        metrics = {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)]
                   for k in run.data.metrics}  # fmt: skip
        root = Path(run.info.artifact_uri.removeprefix("file://"))
        files = {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}
        return run.info.status, run.info.end_time, run.data.tags, metrics, files

    first = train(params)
    before = provenance(first["mlflow_run_id"])
    grids = image_steps(client, first["mlflow_run_id"], SAMPLES_KEY)
    assert before[0] == "FINISHED" and list(grids) == [4, 8] and grids[8] in before[4]

    # train.out_dir deleted (dvc repro -f): written again from the checkpoint, the run untouched
    shutil.rmtree(out)
    again = train(params)
    assert again["mlflow_run_id"] == first["mlflow_run_id"] and again["steps"] == 8
    assert (out / "candidates" / again["run_name"] / WEIGHTS).is_file()
    assert provenance(first["mlflow_run_id"]) == before

    # trained on, with the newest checkpoint cut short: from the one before, as a new run
    newest = sorted((runs / first["run_name"]).glob("checkpoint_*/"))[-1]
    (newest / WEIGHTS).write_bytes((newest / WEIGHTS).read_bytes()[:1000])
    more = train(longer)
    assert more["steps"] == 12 and more["mlflow_run_id"] != first["mlflow_run_id"]
    tags = client.get_run(more["mlflow_run_id"]).data.tags
    assert tags["ganpipe.resumed_from_run"] == first["mlflow_run_id"]
    assert tags["ganpipe.resumed_from_step"] == "4"
    history = (out / "history.csv").read_text().splitlines()
    assert [row.split(",")[-1] for row in history[1:]] == ["4", "8", "12"]
    logged = [m.step for m in client.get_metric_history(more["mlflow_run_id"], "loss_d")]
    assert logged == [8, 12]
    assert provenance(first["mlflow_run_id"]) == before

    # runs/ gone: trained from step 0 as a new run
    shutil.rmtree(runs)
    fresh = train(longer)
    assert fresh["mlflow_run_id"] not in (first["mlflow_run_id"], more["mlflow_run_id"])
    assert provenance(first["mlflow_run_id"]) == before
    logged = [m.step for m in client.get_metric_history(fresh["mlflow_run_id"], "loss_d")]
    assert logged == [4, 8, 12]


@pytest.mark.slow
def test_sigint_stops_within_30_s_keeps_the_checkpoint_and_marks_the_run_killed(tmp_path, prepared):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.checkpoint import read_checkpoint

    params = tiny_params(tmp_path, "sigint", steps=100000)
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    runs = tmp_path / "sigint" / "runs"
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/checkpoint_*/state.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(1)
    assert list(runs.glob("*/checkpoint_*/state.json")), "no checkpoint within 4 minutes"
    os.kill(process.pid, signal.SIGINT)
    start = time.monotonic()
    process.wait(timeout=60)
    assert time.monotonic() - start < 30
    assert process.returncode == 130
    latest = sorted(runs.glob("*/checkpoint_*/state.json"))[-1].parent
    tensors, meta = read_checkpoint(latest)  # intact
    assert meta["step"] >= 4 and "generator_ema.to_image.weight" in tensors
    client = MlflowClient(params.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ganpipe").experiment_id])
    assert run.info.status == "KILLED"

    # a new driver (as after a crash, `dvc repro` again) picks the run up at its checkpoint
    target = meta["step"] + 4
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--set", f"train.steps={target}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the console of a short run (not a terminal): plain progress lines, no Ray report dumps,
    # no routine INFO logging, no carriage returns
    console = resumed.stdout + resumed.stderr
    progress = rf"train gan-dcgan-\w+: step {target:,}/{target:,} \(100%\) \| [\d,]+ img/s"
    assert re.search(progress, console), console[-3000:]
    assert "Reporting training result" not in console and "TrainingReport(" not in console
    assert not re.search(r"\bINFO\b", console) and "\r" not in console, console[-3000:]
    summary = json.loads((tmp_path / "sigint" / "out" / "result.json").read_text())
    assert summary["steps"] == target and summary["mlflow_run_id"] == run.info.run_id
    history = (tmp_path / "sigint" / "out" / "history.csv").read_text().splitlines()
    assert [int(row.rsplit(",", 1)[1]) for row in history[1:]][-2:] == [meta["step"], target]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def _exposed(processes) -> list:
    """The listening TCP sockets of `processes` that are not on a loopback address."""
    import ipaddress

    import psutil

    found = []
    for process in processes:
        try:
            sockets = process.net_connections("inet")
        except psutil.Error:
            continue
        for s in sockets:
            ip = ipaddress.ip_address(s.laddr.ip.split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip
            if s.status == psutil.CONN_LISTEN and not ip.is_loopback:
                found.append((process.name(), f"{s.laddr.ip}:{s.laddr.port}"))
    return found


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_nor_open_port_and_its_run_is_closed(
    tmp_path, prepared
):
    """After SIGKILL of the driver, Ray's workers trained on for ~10 s and its dashboard and
    runtime-env agents stayed up, listening on 0.0.0.0 and the host's address."""
    import subprocess
    import sys
    import time

    import psutil

    from pipeline.tracking import CLOSED_TAG, close_abandoned_runs

    params = tiny_params(tmp_path, "sigkill", steps=100000)
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump(mode="json")))
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "train"], cwd=tmp_path, stdout=log, stderr=log
        )
    runs = tmp_path / "sigkill" / "runs"
    try:
        deadline = time.monotonic() + 240
        while not list(runs.glob("*/checkpoint_*/state.json")) and time.monotonic() < deadline:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(1)
        time.sleep(3)  # the agents' listeners are up
        ray = psutil.Process(driver.pid).children(recursive=True)
        names = " ".join(sorted(p.name() for p in ray))
        for name in ("raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert name in names, names
        exposed = _exposed([psutil.Process(driver.pid), *ray])
        # torch.distributed's TCPStore (rank 0's DDP rendezvous) listens on every interface
        # while training, and torch has no option to bind it elsewhere: the one allowed
        store = [(n, a) for n, a in exposed if n == "ray::RayTrainWorker" and a.startswith(":::")]
        assert len(store) <= 1 and [e for e in exposed if e not in store] == [], exposed
    finally:
        driver.kill()
        driver.wait()
    _, alive = psutil.wait_procs(ray, timeout=20)
    assert [p.name() for p in alive] == []

    client = MlflowClient(params.tracking.uri)
    experiment = client.get_experiment_by_name("ganpipe").experiment_id
    (run,) = client.search_runs([experiment])
    deadline = time.monotonic() + 60  # the watcher closes it (it stayed RUNNING until the next run)
    while client.get_run(run.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and str(driver.pid) in run.data.tags[CLOSED_TAG]
    assert close_abandoned_runs(client, experiment) == []  # nothing left for the next run


def test_a_train_out_dir_holding_what_ganpipe_did_not_write_is_refused_before_any_work(tmp_path):
    from pipeline.artifacts import TRAIN_OUTPUTS as OUTPUTS
    from pipeline.files import OutputError
    from pipeline.train import train
    from pipeline.training.outputs import check_train_outputs

    params = tiny_params(tmp_path, "user")  # no prepared data: the check comes first
    out = Path(params.train.out_dir)
    out.mkdir(parents=True)
    (out / "samples.png").write_bytes(b"the user's own figure")
    with pytest.raises(OutputError, match=r"train.out_dir .* holds samples.png, which the train"):
        train(params)
    assert (out / "samples.png").read_bytes() == b"the user's own figure"
    # outputs of a train stage from before the ownership markers are recognised by result.json
    (out / "samples.png").unlink()
    for name in OUTPUTS:
        (out / name).write_text(json.dumps({"candidates": []}))
    check_train_outputs(params)
    (out / "notes.txt").write_text("a user's file beside the outputs is left alone")
    check_train_outputs(params)


def progan_params(tmp_path, name, **train):
    """tiny_params with progressive growing from 4 to 8 px, 128 images per phase and a batch
    per resolution: 64 images a step at 4 px (2 workers x 32: two of the loader's 16-image
    batches joined), 32 at 8 px. Stabilise 4 px (steps 0-1), fade 8 px in (2-5), stabilise."""
    tree = tiny_params(tmp_path, name, **train).model_dump(mode="json")
    tree["model"] |= {"family": "progan", "start_resolution": 4, "g_width": 16, "d_width": 16}
    tree["train"] |= {"stabilise_kimg": 0.128, "fade_kimg": 0.128, "loss": "wasserstein",
                      "gp_weight": 10.0, "drift_weight": 0.001,
                      "batch_size_per_resolution": {4: 32}}  # fmt: skip
    return validate_params(tree)


@pytest.mark.slow
def test_progan_killed_mid_fade_resumes_to_the_same_weights_with_ranks_in_lockstep(
    tmp_path, ray_session, prepared
):
    """Rank 1 dies at step 5 (alpha 0.75 of the fade-in to 8 px); the run resumes from the
    step-4 checkpoint, itself taken mid-fade (alpha 0.25), its data read on at the images
    shown (the batch changed with the resolution), and ends bitwise equal to an uninterrupted
    run; debug_checks compare the two ranks' weights at every checkpoint."""
    from pipeline.train import train

    steady, faulty = progan_params(tmp_path, "steady"), progan_params(tmp_path, "faulty")
    a = train(steady)
    with drill(FaultPlan(exit_rank=1, exit_at_step=5, marker=str(tmp_path / "died"))):
        b = train(faulty)
    assert (tmp_path / "died").exists()
    assert a["steps"] == b["steps"] == 12
    assert reported_steps(faulty, b) == [4, 8, 12]  # resumed at step 4, mid-fade
    weights_a, weights_b = final_weights(steady), final_weights(faulty)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0, msg=key)
    rows = (tmp_path / "faulty" / "out" / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    stages = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    assert [(s["step"], s["resolution"], float(s["alpha"])) for s in stages] == [
        ("4", "8", 0.25),
        ("8", "8", 1.0),
        ("12", "8", 1.0),
    ]  # the stage of each report's last step (step 3: 160 images shown, 1/4 faded in)
    candidate = json.loads(Path(faulty.train.out_dir, "result.json").read_text())["candidates"]
    state = json.loads(Path(faulty.train.out_dir, candidate[0]["checkpoint"], "state.json")
                       .read_text())  # fmt: skip
    assert state["stage"] == {"resolution": 8, "alpha": 1.0, "phase": 2}
    # a checkpoint of a run that ended mid-fade has nothing to score: evaluate refuses it (Ray
    # keeps the last two checkpoints, both grown: the step-4 stage is put on a copy)
    early = tmp_path / "early"
    shutil.copytree(Path(faulty.train.out_dir, candidate[0]["checkpoint"]), early)
    stage = [s for s in stages if s["step"] == "4"][0]
    state["stage"] = {"resolution": 8, "alpha": float(stage["alpha"]), "phase": 1}
    (early / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"ended growing at 8 px \(alpha 0.250\)"):
        generator_from_checkpoint(early, read_manifest(Path(steady.prepare.out_dir)))
