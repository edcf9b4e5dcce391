"""What a person browsing a real `mlflow server` sees: a training run's sample grids on the
image panel's step slider, read over the server's REST API exactly as MLflow 3.17's UI reads
them (no browser is installed here; docs/results.md "MLflow pages" gives the manual check).

The UI (mlflow/server/js, the `imagesByRunUuid` reducer and the image chart) shows the panel
for runs tagged `mlflow.loggedImages`, lists `ajax-api/2.0/mlflow/artifacts/list` with
`path=images`, splits each file name on "+" (or "%") into key, "step", step, "timestamp", ms,
uuid and an optional "compressed", builds one slider per key from the steps, and fetches the
pictures with `get-artifact?path=...&run_uuid=...`."""

import io
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.cluster import free_port
from pipeline.training.tracker import SAMPLES_KEY, RunRef, RunTracker
from tests.conftest import background, wait_until
from tests.pipeline.test_tracking import grid_file

STEPS = (4, 8, 12)


def ui_image_entry(path: str) -> dict:
    """One artifact of the run's images/ folder as the UI parses it (it throws on a name that
    does not fit, and shows no images for that run)."""
    name = path.removeprefix("images/")
    extension = name.rsplit(".", 1)[-1]
    stem = name[: -(len(extension) + 1)]
    delimiter = next(d for d in ("%", "+") if d in stem)
    key, step_word, step, timestamp_word, timestamp, *_ = stem.split(delimiter)
    assert (step_word, timestamp_word) == ("step", "timestamp"), path
    return {
        "key": key.replace("~", "/").replace("#", "/"),
        "step": int(step),
        "timestamp": int(timestamp),
        "compressed": stem.endswith("compressed"),
        "extension": extension,
    }


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        return response.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An `mlflow server` on 127.0.0.1 (sqlite, artifacts proxied), as in cluster mode."""
    work = tmp_path_factory.mktemp("server")
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
        "--port", url.rsplit(":", 1)[1], "--workers", "1",
        "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
        "--artifacts-destination", (work / "artifacts").as_uri(),
    ]  # fmt: skip

    def up() -> bool:
        try:
            return _get(f"{url}/health") == b"OK"
        except OSError:
            return False

    with background(command, None, work / "mlflow.log") as process:
        wait_until(up, "mlflow server", process, work / "mlflow.log")
        yield url


def test_the_run_page_shows_the_grids_on_a_step_slider(server, tmp_path):
    client = MlflowClient(server)
    run_id = client.create_run(client.create_experiment("pages")).info.run_id
    tracker = RunTracker(RunRef(server, run_id))  # what rank 0 does at each checkpoint
    grids = {step: grid_file(tmp_path, step) for step in STEPS}
    for step, (path, _) in grids.items():
        tracker.log_image(path, SAMPLES_KEY, step)
    client.set_terminated(run_id)

    ajax = f"{server}/ajax-api/2.0/mlflow"
    run = json.loads(_get(f"{ajax}/runs/get?run_id={run_id}"))["run"]
    assert {"key": "mlflow.loggedImages", "value": "True"} in run["data"]["tags"]
    listing = json.loads(_get(f"{ajax}/artifacts/list?run_uuid={run_id}&path=images"))
    entries = [(f["path"], ui_image_entry(f["path"])) for f in listing["files"]]
    assert {e["key"] for _, e in entries} == {SAMPLES_KEY}
    slider = sorted({e["step"] for _, e in entries})
    assert slider == list(STEPS)  # the slider's marks
    for step in STEPS:
        at_step = {(e["compressed"], e["extension"]): path for path, e in entries
                   if e["step"] == step}  # fmt: skip
        assert set(at_step) == {(False, "png"), (True, "webp")}  # the image and its thumbnail
        for (compressed, _), path in at_step.items():
            query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
            picture = Image.open(io.BytesIO(_get(f"{server}/get-artifact?{query}")))
            assert picture.format == ("WEBP" if compressed else "PNG")
            if not compressed:  # the full-size image is the grid of that step, unchanged
                np.testing.assert_array_equal(np.asarray(picture), grids[step][1])
    assert b"<html" in _get(f"{server}/").lower()  # the UI itself is served
