"""Cluster mode, for real on this machine: a Ray head started with `ray start --head` and a
second node joined with `ray start --address` (loopback, one CPU each, token authentication
on), an `mlflow server` on 127.0.0.1 as the tracking server and checkpoint storage given by
URI. The pipeline goes in as a user submits it, `ray job submit -- dvc --cd <project> repro`:
training runs 2 workers on the 2 nodes, and the generator is registered into the server.
Everything the tests start is stopped at the end."""

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import free_port
from tests.conftest import (
    background,
    clone_project,
    project_env,
    shell,
    stages_run,
    stop,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),  # the first test's fixture builds the cluster and runs the pipeline
    pytest.mark.skipif(shutil.which("git") is None, reason="DVC needs git"),
]


def answers(url: str) -> bool:
    """Any HTTP answer counts (Ray's dashboard says 401 without the token)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def ray_nodes(env: dict, address: str) -> int:
    code = (
        "import ray; ray.init(log_to_driver=False); "
        "print('nodes=%d' % sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "RAY_ADDRESS": address},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    counts = [line.removeprefix("nodes=") for line in out.stdout.splitlines()]
    return next((int(c) for c in counts if c.isdigit()), 0)


def digits_folder(root: Path) -> None:
    """scikit-learn's digits as a user's image folder, images/<class>/<n>.png."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / "images" / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{n}.png")


def small_params(root: Path) -> None:
    """The shipped params on an image folder, trained briefly by progressive growing (4 ->
    16 px over the run's 40 steps): 2 workers, one per node, in lockstep."""
    digits_folder(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"] |= {"source": "imagefolder", "image_dir": "images"}
    params["model"] |= {"family": "progan", "g_width": 32, "d_width": 32}
    # debug_checks: the ranks compare their weights before every checkpoint (a run whose
    # nodes drift apart fails)
    params["train"] |= {"steps": 40, "log_every": 20, "checkpoint_every": 20, "debug_checks": True}
    params["featurenet"] |= {"epochs": 3, "min_accuracy": 0.5}
    params["evaluate"] |= {"num_samples": 500, "kid_subset_size": 250}
    params["augment"] |= {"seeds": 1, "shots": [10]}  # measured elsewhere: the cluster's time
    params["ray"] |= {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"}
    params["train"]["batch_size"] = 64
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node Ray cluster and an MLflow server, both on 127.0.0.1, and a project clone."""
    work = tmp_path_factory.mktemp("cluster")
    root = clone_project(work / "ganpipe")
    small_params(root)
    # Ray's socket paths must stay short: its temp dirs live directly under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="gp-ray-", dir="/tmp"))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = project_env(root, **auth)
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "mlflow")}
    address = f"127.0.0.1:{ports['gcs']}"
    ray = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus", "1",
           "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]  # fmt: skip
    head = ray + [
        "--head", "--port", str(ports["gcs"]), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client"]), "--temp-dir", str(temp / "head"),
        "--dashboard-agent-listen-port", str(free_port()),
    ]  # fmt: skip
    worker = ray + [
        "--address", address, "--temp-dir", str(temp / "worker"),
        "--dashboard-agent-listen-port", str(free_port()),
    ]  # fmt: skip
    mlflow_uri = f"http://127.0.0.1:{ports['mlflow']}"
    server = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
        "--port", str(ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
        "--artifacts-destination", (work / "server-artifacts").as_uri(),
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        tracking = stack.enter_context(background(server, env, work / "mlflow.log"))
        head_node = stack.enter_context(background(head, env, work / "head.log"))
        wait_until(
            lambda: answers(f"http://127.0.0.1:{ports['dashboard']}/api/version"),
            "the Ray head", head_node, work / "head.log",
        )  # fmt: skip
        worker_node = stack.enter_context(background(worker, env, work / "worker.log"))
        wait_until(
            lambda: ray_nodes(env, address) == 2, "the second node", worker_node,
            work / "worker.log",
        )  # fmt: skip
        wait_until(lambda: answers(f"{mlflow_uri}/health"), "MLflow", tracking, work / "mlflow.log")
        yield {
            "root": root, "env": env, "address": address, "mlflow": mlflow_uri,
            "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
            "storage": (work / "storage").as_uri(), "processes": [tracking, head_node, worker_node],
        }  # fmt: skip
        stop([worker_node, head_node, tracking])  # all at once
    leftover = processes_of(temp, seconds=30)
    for process in leftover:
        process.kill()
    shutil.rmtree(temp, ignore_errors=True)
    assert not leftover, f"left running after the cluster was stopped: {leftover}"


def processes_of(temp: Path, seconds: float) -> list:
    """Ray processes still running from the nodes under `temp`, after waiting `seconds`."""
    import psutil

    deadline = time.monotonic() + seconds
    while True:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(temp) in " ".join(process.info["cmdline"] or []):
                    found.append(process)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1)


@pytest.fixture(scope="module")
def submitted(cluster):
    """`ray job submit -- dvc --cd <project> repro` with the tracking server and the storage
    URI in the job's environment, as a user submits the pipeline to a cluster."""
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": cluster["mlflow"],
                     "GANPIPE_STORAGE_PATH": cluster["storage"]},
    }  # fmt: skip
    job = shell(cluster["root"], cluster["env"])(
        "ray", "job", "submit", "--address", cluster["dashboard"],
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "dvc", "--cd", str(cluster["root"]), "repro",
        timeout=1200,
    )  # fmt: skip
    return job


def test_the_submitted_pipeline_trains_on_both_nodes_and_registers_into_the_server(
    cluster, submitted
):
    from mlflow.tracking import MlflowClient

    assert stages_run(submitted.stdout) == [
        "prepare", "featurenet", "train", "evaluate", "augment", "register"
    ], submitted.stdout[-3000:]  # fmt: skip
    assert "succeeded" in submitted.stdout, submitted.stdout[-3000:]
    root = cluster["root"]
    result = json.loads((root / "models/train/result.json").read_text())
    client = MlflowClient(cluster["mlflow"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ganpipe.num_nodes"] == "2"  # rank 0 and rank 1 on different nodes
    assert run.data.params["train.debug_checks"] == "True"  # equal weights at each checkpoint
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")] == [20, 40]

    registered = json.loads((root / "models/register/registered.json").read_text())
    champion = client.get_model_version_by_alias(registered["model_name"], "champion")
    assert str(champion.version) == str(registered["version"])
    assert champion.run_id == run.info.run_id

    assert champion.tags["ganpipe.family"] == "progan"

    # Checkpoints went to the storage URI, not into the project directory.
    storage = Path(cluster["storage"].removeprefix("file://"))
    assert list(storage.glob(f"{result['run_name']}/checkpoint_*/state.json"))
    assert not (root / "runs").exists()
    assert (root / "models/train/candidates" / result["run_name"]).is_dir()


def test_the_grown_champion_serves_over_http_at_the_final_resolution_only(
    cluster, submitted, tmp_path
):
    """`mlflow models serve` of the server's champion (progan grown to 16 px): the images of
    the Python API, from a generator that holds one toRGB layer, the final resolution's."""
    import numpy as np

    import ganpipe
    from tests.pipeline.test_serving import serve

    champion = "models:/ganpipe-generator@champion"
    generator = ganpipe.load(champion, cluster["mlflow"])
    to_rgb = [k for k in generator.generator.state_dict() if "rgb" in k.lower()]
    assert to_rgb and all("16" in k or "final" in k for k in to_rgb), to_rgb
    env = {**cluster["env"], "MLFLOW_TRACKING_URI": cluster["mlflow"]}
    with serve(champion, env, tmp_path) as post:
        status, body = post({"dataframe_records": [{"num_images": 3, "seed": 4}]})
    assert status == 200, body
    images = np.asarray(body["predictions"], dtype=np.float32)
    assert images.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(images, generator.sample(3, seed=4).numpy(), atol=1e-6)


def test_joining_without_the_cluster_token_is_a_clear_error(cluster, submitted):
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "RAY_AUTH_MODE": "disabled",
           "MLFLOW_TRACKING_URI": cluster["mlflow"]}  # fmt: skip
    env.pop("RAY_AUTH_TOKEN")
    runs_before = len(mlflow_runs(cluster["mlflow"]))
    start = time.monotonic()
    failed = shell(cluster["root"], env)("ganpipe", "train", check=False, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert time.monotonic() - start < 20  # refused at the first request (ray.init retried 20 s)
    last = failed.stderr.strip().splitlines()[-1]  # above it: Ray's own log lines
    assert last.startswith(
        f"ganpipe train: cannot join the Ray cluster at {cluster['address']} (from RAY_ADDRESS)"
    ), failed.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in last
    assert len(mlflow_runs(cluster["mlflow"])) == runs_before  # no run left behind


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ganpipe")
    return client.search_runs([experiment.experiment_id]) if experiment else []
