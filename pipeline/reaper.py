"""Watches a pipeline process that started a local Ray, and cleans up after it however it ends.

When the pipeline is killed (SIGKILL), Ray's raylet dies with it, but its workers trained on for
about 10 s and its dashboard and runtime-env agents stayed up for a minute, ignoring SIGTERM
(seen with Ray 2.60), and the MLflow run stayed RUNNING until the next run. This watcher runs
beside the pipeline (`python -m pipeline.reaper DRIVER_PID OWNER_ENV OWNER`, in a session of its
own); every second it remembers the pipeline's Ray descendants (a command line naming ray: the
raylet, gcs_server, ray:: workers, the agents; never the user's other children) and reads the
MLflow stores the pipeline names on its stdin (JSON lines [tracking_uri, experiment_id]). Its
stdin closing means the pipeline ended: then it kills those processes still alive, their children
and every process whose environment has OWNER_ENV=OWNER (workers started in the last second,
their raylet gone) with SIGKILL (they ignore SIGTERM once their raylet is gone), and marks KILLED
the runs the pipeline left RUNNING (pipeline.tracking.close_abandoned_runs). It imports psutil
only, until that end.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys

import psutil

TAG = "pipeline.reaper"  # in every watcher's command line: watchers never kill each other


def _ours(process: psutil.Process) -> bool:
    try:
        return process.pid != os.getpid() and TAG not in process.cmdline()
    except psutil.Error:
        return False


def _ray_process(process: psutil.Process) -> bool:
    try:
        return "ray" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _marked(process: psutil.Process, key: str, owner: str) -> bool:
    try:
        return process.environ().get(key) == owner
    except (psutil.Error, OSError):
        return False


def watch(driver: int) -> tuple[dict, set]:
    """Until stdin closes: the driver's Ray descendants seen, and the MLflow stores named."""
    seen: dict[int, psutil.Process] = {}
    stores: set[tuple[str, str]] = set()
    pending = b""
    stdin = sys.stdin.fileno()
    while True:
        if select.select([stdin], [], [], 1.0)[0]:
            chunk = os.read(stdin, 65536)
            if not chunk:
                return seen, stores
            *lines, pending = (pending + chunk).split(b"\n")
            stores.update(tuple(json.loads(line)) for line in lines if line.strip())
        try:
            children = psutil.Process(driver).children(recursive=True)
        except psutil.Error:  # the driver is gone (a forked child may keep the pipe open)
            return seen, stores
        seen.update((c.pid, c) for c in children if c.pid not in seen and _ray_process(c))


def reap(seen: dict, key: str, owner: str) -> None:
    """SIGKILL the remembered processes still alive, their children and the marked ones."""
    left = {p.pid: p for p in seen.values() if p.is_running() and _ours(p)}
    for process in list(left.values()):
        with contextlib.suppress(psutil.Error):
            left.update((c.pid, c) for c in process.children(recursive=True) if _ours(c))
    left.update((p.pid, p) for p in psutil.process_iter() if _marked(p, key, owner) and _ours(p))
    for process in left.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(left.values()), timeout=10)


def close_runs(stores: set) -> None:
    """Mark KILLED the runs left RUNNING by drivers that are gone, in each store named."""
    if not stores:
        return
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import close_abandoned_runs

    for uri, experiment in stores:
        with contextlib.suppress(Exception):  # if not, the next run closes them
            close_abandoned_runs(MlflowClient(uri), experiment)


def main(argv: list[str]) -> None:
    driver, key, owner = int(argv[0]), argv[1], argv[2]
    seen, stores = watch(driver)
    reap(seen, key, owner)
    close_runs(stores)


if __name__ == "__main__":
    main(sys.argv[1:])
