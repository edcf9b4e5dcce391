"""MLflow tracking: concurrent trials in the sqlite store, which runs may be continued, and
sample grids as step images."""

import multiprocessing
import os

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.training.tracker import SAMPLES_KEY, RunRef, RunTracker, image_steps

REPORTS, METRICS = 60, 12


def _report(uri: str, run_id: str, errors) -> None:
    """What a sweep trial's rank 0 does at every report (RunTracker.log_metrics)."""
    tracker = RunTracker(RunRef(uri, run_id))
    for step in range(1, REPORTS + 1):
        try:
            tracker.log_metrics({f"m{k}": step * 0.5 + k for k in range(METRICS)}, step)
        except Exception as exc:  # counted, so the test shows what went wrong
            errors.put(repr(exc))


def test_four_concurrent_trials_lose_no_metric_point_in_sqlite(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    runs = [client.create_run(experiment).info.run_id for _ in range(4)]
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    writers = [context.Process(target=_report, args=(uri, run, errors)) for run in runs]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []  # e.g. no "database is locked"
    for run in runs:
        for k in range(METRICS):
            history = client.get_metric_history(run, f"m{k}")
            assert sorted(m.step for m in history) == list(range(1, REPORTS + 1))
            assert {m.value for m in history} == {s * 0.5 + k for s in range(1, REPORTS + 1)}


def _dead_pid() -> int:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the tests below (creating one takes seconds)."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")


def test_runs_left_running_by_a_killed_driver_are_closed_and_no_other(store):
    """A driver killed with SIGKILL left its run RUNNING until the next run reused it."""
    import socket

    import psutil

    from pipeline.tracking import CLOSED_TAG, DRIVER_TAG, close_abandoned_runs, driver_id

    client = store
    experiment = client.create_experiment("killed")
    host = socket.gethostname()
    reused_pid = f"{host}:{os.getpid()}:{psutil.Process().create_time() - 100:.2f}"
    drivers = {
        "killed": f"{host}:{_dead_pid()}:1.00",
        "pid_reused": reused_pid,  # the pid is alive, but it is another process now
        "alive": driver_id(),
        "other_machine": "elsewhere:1:1.00",
        "untagged": None,
        "finished": f"{host}:{_dead_pid()}:1.00",
    }
    runs = {}
    for name, driver in drivers.items():
        tags = {DRIVER_TAG: driver} if driver else {}
        runs[name] = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    client.set_terminated(runs["finished"], "FINISHED")
    closed = close_abandoned_runs(client, experiment)
    assert sorted(closed) == sorted([runs["killed"], runs["pid_reused"]])
    status = {name: client.get_run(run).info.status for name, run in runs.items()}
    assert status == {"killed": "KILLED", "pid_reused": "KILLED", "alive": "RUNNING",
                      "other_machine": "RUNNING", "untagged": "RUNNING",
                      "finished": "FINISHED"}  # fmt: skip
    reason = client.get_run(runs["killed"]).data.tags[CLOSED_TAG]
    assert reason.startswith(f"its driver ({drivers['killed']}) ended without closing it")


def test_a_finished_run_is_never_continued(store):
    from pipeline.tracking import TrackingError, reopen_run, unfinished_run

    client = store
    experiment = client.create_experiment("finished")
    finished = client.create_run(experiment, tags={"n": "a"}).info.run_id
    client.set_terminated(finished, "FINISHED")
    assert unfinished_run(client, experiment, "tags.n = 'a'") is None
    with pytest.raises(TrackingError, match=f"MLflow run {finished} is FINISHED"):
        reopen_run(client, finished)
    killed = client.create_run(experiment, tags={"n": "b", "gone": "x"}).info.run_id
    client.set_terminated(killed, "KILLED")
    assert unfinished_run(client, experiment, "tags.n = 'b'").info.run_id == killed
    reopen_run(client, killed, clear_tags=("gone",))
    run = client.get_run(killed)
    assert run.info.status == "RUNNING" and "gone" not in run.data.tags


def grid_file(directory, step: int):
    """A small RGB 'sample grid' whose pixels say which step it is from."""
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :, 0], pixels[: step % 24, :, 1] = step * 10 % 256, 255
    path = directory / f"grid-{step}.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_sample_grids_are_step_images_the_ui_reads_back_per_step(store, tmp_path):
    client = store
    run_id = client.create_run(client.create_experiment("images")).info.run_id
    tracker = RunTracker(RunRef(client.tracking_uri, run_id))
    grids = {step: grid_file(tmp_path, step) for step in (4, 8, 12)}
    for step, (path, _) in grids.items():
        tracker.log_image(path, SAMPLES_KEY, step)
    tracker.log_image(grids[4][0], "other", 4)  # another key has a slider of its own
    steps = image_steps(client, run_id, SAMPLES_KEY)
    assert list(steps) == [4, 8, 12] and list(image_steps(client, run_id, "other")) == [4]
    for step, artifact in steps.items():  # each step's image is that step's grid, unchanged
        local = client.download_artifacts(run_id, artifact, str(tmp_path / f"down-{step}"))
        np.testing.assert_array_equal(np.asarray(Image.open(local)), grids[step][1])
    listed = [a.path for a in client.list_artifacts(run_id, "images")]
    assert len(listed) == 8  # a full-size png and a thumbnail webp per image
    assert sum(p.endswith("+compressed.webp") for p in listed) == 4
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"  # the UI's cue
    # the grid of a step logged again (a resumed run): the newer image is the step's
    tracker.log_image(grids[12][0], SAMPLES_KEY, 8)
    assert image_steps(client, run_id, SAMPLES_KEY)[8] not in steps.values()
    RunTracker(None).log_image(grids[4][0], SAMPLES_KEY, 4)  # untracked: records nothing
