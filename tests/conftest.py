"""Shared test helpers."""

import os

# The suite runs two test workers on two cores, each with Ray workers of its own: a thread per
# process, or their OpenMP pools spin against each other (the same tests measured 76 instead
# of 97 CPU-seconds). Set before numpy and torch size their pools; every Ray worker, driver
# subprocess and DVC stage the tests start inherits it (Ray leaves a set value alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's controller polls its workers every 2 s: a run's end and a dead worker are seen a
# poll or two late. Every Ray the tests start (in-process, driver subprocesses, `ray start`
# nodes) inherits this, and the fault drills wait two polls (pipeline.training.faults).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import contextlib
import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def tree_digest(root: Path) -> str:
    """A hash of every file's path and bytes under `root` (to prove nothing changed)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def clone_project(dest: Path) -> Path:
    """A `git clone` of this repository, as a user gets it, with the working tree's
    uncommitted changes on top (the end-to-end tests run the code that is checked out)."""

    def git(*args, cwd=REPO_ROOT):
        return subprocess.run(
            ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout

    git("clone", "-q", str(REPO_ROOT), str(dest))
    changed = git("diff", "-z", "--name-only", "HEAD") + git(
        "ls-files", "-z", "--others", "--exclude-standard"
    )
    for name in filter(None, changed.split("\0")):
        source, target = REPO_ROOT / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:  # deleted in the working tree
            target.unlink(missing_ok=True)
    return dest


def project_env(root: Path, **extra: str) -> dict:
    """The environment a user's shell has in a clone: this virtualenv on PATH, the clone's
    code first on the import path, a git identity, and no cluster, storage or tracking
    server from the test's own shell (`extra` sets them)."""
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.pop("GANPIPE_STORAGE_PATH", None)
    return {**env, **extra}


def shell(root: Path, env: dict):
    """`sh(*command)` runs a command in `root` with `env`; a failure shows its output."""

    def sh(*command, check=True, timeout=1800):
        result = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode:
            output = f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
            raise AssertionError(f"{command} failed:\n{output}")
        return result

    return sh


@contextlib.contextmanager
def background(command: list[str], env: dict, log: Path, cwd: Path | None = None):
    """A long-running process (a server, a Ray node) in its own session, its output in
    `log`; ended with its children on exit."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        stop([process])


def stop(processes: list[subprocess.Popen], grace: float = 5) -> None:
    """SIGTERM to each process's group at once, SIGKILL to the groups still up after `grace`
    seconds (a Ray node's raylet and GCS take 30 s to end on SIGTERM; a test's servers have
    nothing to drain)."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(ready, what: str, process: subprocess.Popen, log: Path, seconds: float = 120):
    """Poll `ready()` until true; fail with the log if `process` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


# The longest modules first (minutes each, mostly Ray start-up and DVC), the rest fill in
# behind them: under the README's `pytest -n 2 --dist loadfile`, xdist hands out modules in
# this order (pyproject.toml turns off its reordering by number of tests, which started these
# few-test modules last and left one worker running them alone: simulated from measured module
# times, 1,173 s against 1,080).
LONGEST_FIRST = (
    "tests/test_pipeline.py",
    "tests/pipeline/test_sweep.py",
    "tests/pipeline/test_train.py",
    "tests/test_cluster_mode.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


def stages_run(output: str) -> list[str]:
    """The stages `dvc repro` / `dvc exp run` ran, in order, from their output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(autouse=True)
def _no_tracking_server_from_the_shell(monkeypatch):
    """Tests use their own sqlite stores, whatever MLFLOW_TRACKING_URI the shell exports."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes of small images in PNG, JPEG and WebP, mixed sizes and modes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    sizes = [(20, 20), (24, 18), (13, 31), (40, 40)]
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(7):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-dependent colour
            suffix = [".png", ".jpg", ".webp"][i % 3]
            image = Image.fromarray(pixels)
            image = image.convert("L") if i == 5 else image
            image.save(
                root / name / f"img{i}{suffix}", **({"lossless": True} if suffix == ".webp" else {})
            )
    return root
