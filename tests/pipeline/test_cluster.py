"""Cluster settings from params or the environment, and storage paths that may be URIs."""

import os
from pathlib import Path

import pytest

from pipeline.cluster import (
    check_reachable,
    free_port,
    join,
    local_checkpoint,
    ray_address,
    read_json,
    save_json,
    storage_root,
)
from pipeline.config import validate_params
from pipeline.errors import ClusterError


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("GANPIPE_STORAGE_PATH", raising=False)
    return monkeypatch


def test_environment_overrides_params(clean_env, tmp_path):
    params = validate_params({"ray": {"address": "10.0.0.1:6379", "storage_path": "runs"}})
    assert ray_address(params) == "10.0.0.1:6379"
    assert storage_root(params) == str(Path("runs").resolve())  # Ray needs absolute paths
    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    clean_env.setenv("GANPIPE_STORAGE_PATH", "s3://bucket/ganpipe/")
    assert ray_address(params) == "127.0.0.1:6380"
    assert storage_root(params) == "s3://bucket/ganpipe/"
    assert ray_address(validate_params({})) == "127.0.0.1:6380"


def test_no_address_starts_a_local_ray(clean_env):
    assert ray_address(validate_params({})) is None


def test_join_keeps_uri_schemes():
    assert join("s3://bucket/ganpipe/", "sweep-1", "state.json") == (
        "s3://bucket/ganpipe/sweep-1/state.json"
    )
    assert join("/data/runs", "sweep-1") == "/data/runs/sweep-1"


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_json_round_trips_through_local_paths_and_uris(tmp_path, scheme):
    path = scheme + str(tmp_path / "reasons.json")
    assert read_json(path) is None
    save_json(path, {"trial_1": "diverged"})
    save_json(path, {"trial_1": "diverged", "trial_2": "fid_worsening"})
    assert read_json(path) == {"trial_1": "diverged", "trial_2": "fid_worsening"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reasons.json"]


def test_a_checkpoint_in_uri_storage_is_read_through_its_filesystem(tmp_path):
    """Ray reports checkpoints of remote storage without the scheme (bucket/prefix/...)."""
    checkpoint = tmp_path / "sweep" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 20}')
    with local_checkpoint(str(checkpoint), f"file://{tmp_path}") as local:
        assert (local / "state.json").read_text() == '{"step": 20}'
    with local_checkpoint(str(checkpoint), str(tmp_path)) as local:
        assert local == checkpoint


def test_an_address_where_no_cluster_answers_fails_in_seconds(clean_env):
    import time

    port = free_port()
    clean_env.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(
        ClusterError,
        match=rf"no Ray cluster answers at 127.0.0.1:{port} "
        r"\(from RAY_ADDRESS\).*ray start --head",
    ):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    check_reachable("auto")  # Ray resolves these itself


@pytest.mark.slow
def test_workers_of_a_local_ray_reach_its_state_api_beside_another_ray(tmp_path):
    """With another Ray instance on the machine, the workers of the one connect() starts still
    reach their own cluster's state API: Ray Train's placement-group cleaner asks it from a
    worker, and without an address it fails ("Found multiple active Ray instances"), leaving
    a stopped trial's CPUs taken and the sweep hanging. Nor does connect() join the other
    one, although the machine's address file (ray_current_cluster) names it: a pipeline did,
    and died when a test's cluster went away."""
    import secrets
    import subprocess
    import sys
    import tempfile

    from tests.conftest import REPO_ROOT, background, wait_until

    machine_temp = tempfile.mkdtemp(prefix="gp-", dir="/tmp")  # the probe's RAY_TMPDIR
    temp = f"{machine_temp}/ray"  # so its ray_current_cluster names the other Ray
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    other_port = free_port()
    other = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "0",
        "--port", str(other_port), "--dashboard-port", str(free_port()), "--temp-dir", temp,
        "--ray-client-server-port", str(free_port()), "--disable-usage-stats",
    ]  # fmt: skip
    probe = (
        "import ray\n"
        "from pipeline.cluster import connect\n"
        "from pipeline.config import validate_params\n"
        "connect(validate_params({}))\n"
        "@ray.remote(num_cpus=0)\n"
        "def probe():\n"
        "    from ray.util.state import list_nodes\n"
        "    nodes = [n.node_id for n in list_nodes()]\n"
        "    return ray.get_runtime_context().get_node_id() in nodes\n"
        "print('own cluster:', ray.get(probe.remote()))\n"
        "print('joined:', ray.get_runtime_context().gcs_address)\n"
    )
    with background(other, env, tmp_path / "other.log") as head:
        wait_until(lambda: "Ray runtime started" in (tmp_path / "other.log").read_text(),
                   "the other Ray", head, tmp_path / "other.log")  # fmt: skip
        assert Path(temp, "ray_current_cluster").read_text().endswith(f":{other_port}")
        out = subprocess.run(
            [sys.executable, "-c", probe], env={**env, "RAY_TMPDIR": machine_temp},
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert "own cluster: True" in out.stdout, out.stderr[-3000:]
    assert "joined:" in out.stdout and f":{other_port}" not in out.stdout, out.stdout
