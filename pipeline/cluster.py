"""Where the Ray stages run and keep their checkpoints: the cluster they join and the storage
every node sees, from params or the environment (the environment wins, so one params.yaml
serves a laptop and a cluster).

| variable             | overrides           | what                                              |
|----------------------|---------------------|---------------------------------------------------|
| RAY_ADDRESS          | ray.address         | join this running cluster instead of starting one |
| GANPIPE_STORAGE_PATH | ray.storage_path    | checkpoints and Tune state: a shared path or s3:// |

Storage may be a local directory (single node, or a filesystem all nodes mount) or a URI that
pyarrow understands (s3://, gs://): paths are joined as strings, files read through pyarrow.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import ClusterError
from pipeline.files import write_json

ADDRESS_ENV = "RAY_ADDRESS"
STORAGE_ENV = "GANPIPE_STORAGE_PATH"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients find the dashboard
REACH_TIMEOUT_S = 5


def ray_address(params: Params) -> str | None:
    """The cluster to join: RAY_ADDRESS, else ray.address; None starts a local Ray."""
    return os.environ.get(ADDRESS_ENV) or params.ray.address


def connect(params: Params) -> None:
    """Join (or start) Ray once per process; a cluster that cannot be joined is a ClusterError
    in seconds (Ray itself retries an unreachable address for minutes)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(params)
    if address is None:
        start_local_ray()
        return
    check_reachable(address)
    check_admitted(address)
    try:
        ray.init(address=address, **_quiet())
    except ConnectionError as exc:  # Ray chains the reason
        raise ClusterError(_cannot_join(address, exc.__cause__ or exc)) from None


def check_admitted(address: str) -> None:
    """One request to the cluster's GCS at a host:port address: a missing or wrong token is
    refused at once (ray.init retries that for 20 s). Anything else is left to ray.init."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    if address.startswith("ray://") or _host_port(address) is None:
        return
    try:
        GcsClient(address=address)
    except AuthenticationError as exc:
        raise ClusterError(_cannot_join(address, exc)) from None
    except Exception:  # ray.init retries it and says what went wrong
        return


def _cannot_join(address: str, reason: BaseException) -> str:
    last = str(reason).strip().splitlines()[-1]  # a traceback's last line
    return (
        f"cannot join the Ray cluster at {address} ({_where_from()}): {last[:500]}. A cluster "
        "with token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
        "the file ~/.ray/auth_token)"
    )


def _quiet() -> dict:
    """ray.init options for the driver's and the workers' logging (pipeline.console)."""
    import ray

    from pipeline.console import library_log_level

    level = library_log_level()
    return {"logging_level": level, "logging_config": ray.LoggingConfig(log_level=level)}


def start_local_ray(**options) -> None:
    """Start a local Ray (`options` go to ray.init) that listens on loopback only, whose
    workers know its dashboard, and whose processes all end when this process does.

    Loopback: Ray binds its servers (GCS, raylet, workers, and the dashboard and runtime-env
    agents, which run code for whoever reaches them) to its node address, which on Linux is
    the host's network address even for a local Ray. Ray uses 127.0.0.1 where it supports no
    clusters (its ENABLE_RAY_CLUSTER switch, macOS and Windows); a local Ray is such a case,
    so the switch is off while it starts.

    Dashboard: Ray Train's placement-group cleaner asks the state API about its controller from
    a worker; without an address it looks for "the" Ray instance on the machine, and with two
    running (two pipelines, a benchmark next to the tests) it gives up, so a trial that Tune
    stops keeps its CPUs and the sweep hangs (seen with Ray 2.60). The raylet, and every worker
    it starts, inherits the address. address="local": without it ray.init joins whatever
    cluster /tmp/ray/ray_current_cluster names (another user's `ray start`, a test's cluster)
    and dies with it.

    Nothing left behind: when this process is killed (SIGKILL), Ray's raylet dies with it but
    its workers trained on for about 10 s and its agents stayed up for a minute, ignoring
    SIGTERM (seen with Ray 2.60). A watcher (pipeline.reaper) kills what is left of this
    process's Ray descendants, and of the processes marked with OWNER_ENV, once it is gone."""
    import ray
    import ray._private.ray_constants as ray_constants

    port = free_port()
    owner = f"{os.getpid()}-{secrets.token_hex(8)}"
    inherited = {API_SERVER_ENV: f"http://127.0.0.1:{port}", OWNER_ENV: owner}
    previous = {key: os.environ.get(key) for key in inherited}
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(inherited)
    ray_constants.ENABLE_RAY_CLUSTER = False  # node address 127.0.0.1 (read in ray.init)
    try:
        options = {"dashboard_host": LOOPBACK, **_quiet(), **options}
        ray.init(address="local", dashboard_port=port, **options)
    finally:  # this process's later Ray instances (tests) must not inherit them
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _start_reaper(owner)


LOOPBACK = "127.0.0.1"
OWNER_ENV = "GANPIPE_RAY_OWNER"  # set in every process of a local Ray this pipeline started

_reapers: list = []  # their stdin pipes stay open exactly as long as this process lives


def _start_reaper(owner: str) -> None:
    """pipeline.reaper watching this process: it cleans up the local Ray however we end."""
    import subprocess
    import sys

    reaper = subprocess.Popen(
        [sys.executable, "-m", "pipeline.reaper", str(os.getpid()), OWNER_ENV, owner],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    _reapers.append(reaper)


def close_runs_if_killed(tracking_uri: str, experiment: str) -> None:
    """Have the local Ray's watcher mark KILLED the runs of `experiment` this process leaves
    RUNNING if it is killed (SIGKILL: no handler of ours runs). A no-op on a remote cluster:
    there the next run on this machine closes them (tracking.close_abandoned_runs)."""
    line = json.dumps([tracking_uri, experiment]).encode() + b"\n"
    for reaper in _reapers:
        if reaper.poll() is None:
            with contextlib.suppress(OSError):
                reaper.stdin.write(line)
                reaper.stdin.flush()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _where_from() -> str:
    return f"from {ADDRESS_ENV}" if os.environ.get(ADDRESS_ENV) else "from ray.address"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a host:port address; None for the names Ray resolves ("auto")."""
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def check_reachable(address: str) -> None:
    """A host:port address (or ray://host:port) must accept a TCP connection."""
    host_port = _host_port(address.removeprefix("ray://"))
    if host_port is None:
        return  # "auto", "local": Ray resolves them itself
    try:
        socket.create_connection(host_port, timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({_where_from()}): {exc}; start it "
            f"(`ray start --head` prints the address) or unset {ADDRESS_ENV} and ray.address "
            "to run on a local Ray"
        ) from None


def use_gpu(params: Params) -> bool:
    """ray.use_gpu, with `auto` meaning: the connected cluster has GPUs."""
    import ray

    if params.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(params.ray.use_gpu)


def storage_root(params: Params) -> str:
    """GANPIPE_STORAGE_PATH, else ray.storage_path; a local one made absolute (a relative
    path kills Ray Train's controller)."""
    path = os.environ.get(STORAGE_ENV) or params.ray.storage_path
    return path if is_remote(path) else str(Path(path).resolve())


def is_remote(path: str) -> bool:
    return "://" in path


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a directory or a URI (pathlib would fold s3:// into s3:/)."""
    return "/".join([root.rstrip("/"), *parts])


def read_json(path: str) -> dict | None:
    """A JSON file in storage, or None when absent."""
    if not is_remote(path):
        return json.loads(Path(path).read_text()) if Path(path).is_file() else None
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(inner) as stream:
        return json.loads(stream.read())


def save_json(path: str, data: dict) -> None:
    """Write a JSON file in storage (atomically where storage is a local directory; an
    object store's put is atomic by itself)."""
    if not is_remote(path):
        write_json(Path(path), data)
        return
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    with filesystem.open_output_stream(inner) as stream:
        stream.write((json.dumps(data, indent=2) + "\n").encode())


@contextlib.contextmanager
def local_checkpoint(path: str, root: str) -> Iterator[Path]:
    """A local directory holding the checkpoint at `path` as Ray reports it (without a
    scheme for remote storage: the filesystem is the one of `root`); downloaded if remote."""
    if not is_remote(root):
        yield Path(path)
        return
    from pyarrow import fs
    from ray.train import Checkpoint

    filesystem, _ = fs.FileSystem.from_uri(root)
    with Checkpoint(path, filesystem=filesystem).as_directory() as directory:
        yield Path(directory)
