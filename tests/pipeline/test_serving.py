"""Pulling registered generators: by alias and version, checked against the digest the
registry pins, never unpickled, never running code from the artifact; requests checked before
anything is generated; over HTTP with `mlflow models serve`; and through the CLI."""

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema
from PIL import Image

import ganpipe
from gan.export import INFO, WEIGHTS, generator_digest, sha256_file
from gan.sampling import fixed_latents
from pipeline.cli import main
from pipeline.cluster import free_port
from pipeline.errors import RegistryError
from pipeline.generator_model import DIGEST_KEY, DIGEST_TAG
from pipeline.registry import GENERATORS, register
from pipeline.serving import fetch_verified, load_generator_from_uri, sample, sample_grid
from pipeline.tracking import mlflow_at
from tests.pipeline.test_registry import CONDITIONAL_SPEC, evaluation

NAME, CONDITIONAL = "ganpipe-generator", "ganpipe-conditional"
CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One sqlite registry holding an unconditional and a conditional generator."""
    root = tmp_path_factory.mktemp("registry")
    db = root / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = evaluation(root / "plain", {"plain": {"fid_domain": 10.0}}, db)
        register(params)
        conditional = evaluation(
            root / "cond", {"cond": {"fid_domain": 9.0}}, db, spec=CONDITIONAL_SPEC,
            model_name=CONDITIONAL,
        )  # fmt: skip
        register(conditional)
    return {"uri": f"sqlite:///{db}", "params": params, "root": root}


def local_copy(registry, tmp_path) -> Path:
    """The champion's model directory, downloaded to tmp_path (to tamper with)."""
    with mlflow_at(registry["uri"]):
        return Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path / "m")))


def test_sample_grid_from_the_champion(registry, tmp_path):
    out = sample_grid(
        CHAMPION, tmp_path / "grids" / "s.png", 10, seed=3, params=registry["params"], nrow=5
    )
    # torchvision's grid: 2 rows x 5 columns of 16x16 images with 2-pixel padding
    assert Image.open(out).size == (5 * 18 + 2, 2 * 18 + 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.png"]  # no temporary left


def test_sample_is_seeded_and_matches_the_served_model(registry, monkeypatch):
    images = sample(CHAMPION, 4, seed=7, tracking_uri=registry["uri"])
    assert images.shape == (4, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, sample(f"models:/{NAME}/1", 4, 7, tracking_uri=registry["uri"]))
    assert not torch.equal(images, sample(CHAMPION, 4, seed=8, tracking_uri=registry["uri"]))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with mlflow_at(registry["uri"]):
        model = mlflow.pyfunc.load_model(CHAMPION)
    served = model.predict(pd.DataFrame([{"num_images": 4, "seed": 7}]))
    np.testing.assert_array_equal(served, images.numpy())


def test_labels_for_conditional_models_only(registry):
    uri, conditional = registry["uri"], f"models:/{CONDITIONAL}@champion"
    threes = sample(conditional, 4, seed=0, label=3, tracking_uri=uri)
    assert threes.shape == (4, 1, 16, 16)
    cycled = sample(conditional, 4, seed=0, tracking_uri=uri)
    assert not torch.equal(threes, cycled)
    # -1 cycles the classes here as in a served request
    assert torch.equal(cycled, sample(conditional, 4, seed=0, label=-1, tracking_uri=uri))
    with pytest.raises(RegistryError, match=r"label 10 is outside the model's classes 0..9"):
        sample(conditional, 4, label=10, tracking_uri=uri)
    with pytest.raises(RegistryError, match="unconditional"):
        sample(CHAMPION, 4, label=3, tracking_uri=uri)
    with mlflow_at(uri):
        model = mlflow.pyfunc.load_model(conditional)
    rows = pd.DataFrame(
        [{"num_images": 4, "seed": 0, "label": 3}, {"num_images": 2, "seed": 1, "label": -1}]
    )
    np.testing.assert_array_equal(model.predict(rows)[:4], threes.numpy())


def test_unknown_models_name_what_exists(registry):
    uri = registry["uri"]
    with pytest.raises(RegistryError, match=f"registered models: {CONDITIONAL}, {NAME}"):
        sample("models:/nope@champion", 2, tracking_uri=uri)
    with pytest.raises(RegistryError, match=r"aliases: challenger \(version 1\), champion"):
        sample(f"models:/{NAME}@best", 2, tracking_uri=uri)
    with pytest.raises(RegistryError, match="no version 9; its versions: 1"):
        sample(f"models:/{NAME}/9", 2, tracking_uri=uri)
    with pytest.raises(RegistryError, match="no model registry at"):
        sample(CHAMPION, 2, tracking_uri=f"sqlite:///{registry['root'] / 'missing.db'}")


def test_a_registry_tag_that_does_not_match_the_weights_is_refused(registry):
    client = MlflowClient(registry["uri"])
    real = client.get_model_version(NAME, "1").tags[DIGEST_TAG]
    client.set_model_version_tag(NAME, "1", DIGEST_TAG, "0" * 64)
    try:
        with pytest.raises(RegistryError, match="refusing to load them"):
            sample(CHAMPION, 2, tracking_uri=registry["uri"])
    finally:
        client.set_model_version_tag(NAME, "1", DIGEST_TAG, real)


def test_changed_weights_in_a_model_directory_are_refused(registry, tmp_path):
    model_dir = local_copy(registry, tmp_path)
    load_generator_from_uri(str(model_dir))  # loads: the weights match the MLmodel pin
    weights = next(model_dir.rglob(WEIGHTS))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RegistryError, match="replaced or damaged"):
        load_generator_from_uri(str(model_dir))


class Payload:
    """Unpickling this creates `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(registry, tmp_path, monkeypatch):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))  # the payload really runs when unpickled
    assert live.exists()
    marker = tmp_path / "pwned"
    model_dir = local_copy(registry, tmp_path)
    weights = next(model_dir.rglob(WEIGHTS))
    weights.write_bytes(pickle.dumps(Payload(marker)))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")

    with pytest.raises(RegistryError, match="replaced or damaged"):
        load_generator_from_uri(str(model_dir))
    with pytest.raises(RegistryError, match="replaced or damaged"):
        mlflow.pyfunc.load_model(str(model_dir))

    # Forge every hash stored alongside too (no registry to ask here): the file is still only
    # ever read as safetensors.
    info_file = weights.with_name(INFO)
    info_file.write_text(
        json.dumps({**json.loads(info_file.read_text()), "weights_sha256": sha256_file(weights)})
    )
    forge_mlmodel_digest(model_dir)
    with pytest.raises(RegistryError, match="not a safetensors file"):
        load_generator_from_uri(str(model_dir))
    with pytest.raises(RegistryError, match="not a safetensors file"):
        mlflow.pyfunc.load_model(str(model_dir))
    assert not marker.exists()


def forge_mlmodel_digest(model_dir: Path) -> None:
    """What an attacker who can write the model's files does: make the digest stored in the
    MLmodel file match the files as they are now."""
    mlmodel = Model.load(model_dir)
    mlmodel.metadata[DIGEST_KEY] = generator_digest(next(model_dir.rglob(WEIGHTS)).parent)
    mlmodel.save(model_dir / "MLmodel")


@pytest.fixture
def victim(tmp_path):
    """A registry of its own (to tamper with its artifact store): the registered champion, the
    directory that holds its files in the artifact store, and another exported generator."""
    db = tmp_path / "mlflow.db"
    params = evaluation(tmp_path / "v", {"plain": {"fid_domain": 10.0}}, db)
    register(params)
    uri, other = f"sqlite:///{db}", tmp_path / "o"
    evaluation(other, {"other": {"fid_domain": 10.0}}, tmp_path / "unused.db")
    client = MlflowClient(uri)
    model_id = client.get_model_version(NAME, "1").source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return {
        "uri": uri, "model_id": model_id, "store": Path(urllib.parse.urlparse(location).path),
        "other": other / "evaluate" / GENERATORS / "other", "params_file": params_file,
    }  # fmt: skip


def tamper(case: str, store: Path, other: Path, marker: Path) -> None:
    """Change the model in the artifact store as the probe of issue 13 did."""
    data = next(store.rglob(WEIGHTS)).parent
    info = json.loads((data / INFO).read_text())
    if case == "code":  # a module beside the data, that would write `marker` if it ran
        (store / "generator_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    elif case == "swap":  # another generator's weights, spec and a matching MLmodel digest
        for name in (WEIGHTS, INFO):
            shutil.copy(other / name, data / name)
        forge_mlmodel_digest(store)
    elif case == "extra_key":
        info["spec"]["dropout"] = 0.5
    elif case == "width":
        info["spec"]["width"] = 16
    if case in ("extra_key", "width"):
        (data / INFO).write_text(json.dumps(info))


REFUSAL = {
    "code": "holds generator_model.py, which ganpipe never loads",
    "swap": "the weights or the spec were replaced or damaged; refusing to load them",
    "extra_key": "the weights or the spec were replaced or damaged; refusing to load them",
    "width": "the weights or the spec were replaced or damaged; refusing to load them",
}


@pytest.mark.parametrize("case", sorted(REFUSAL))
def test_a_tampered_model_is_refused_on_every_load_path(victim, case, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    uri, logged = victim["uri"], f"models:/{victim['model_id']}"
    with mlflow_at(uri):
        mlflow.pyfunc.load_model(CHAMPION)  # the untouched model loads
    tamper(case, victim["store"], victim["other"], marker)
    with mlflow_at(uri):
        local = Path(mlflow.artifacts.download_artifacts(logged, dst_path=str(tmp_path / "l")))
    for model_uri in (CHAMPION, logged, str(local)):
        with mlflow_at(uri), pytest.raises(RegistryError, match=REFUSAL[case]):
            mlflow.pyfunc.load_model(model_uri)  # what `mlflow models serve` runs
        with pytest.raises(RegistryError, match=REFUSAL[case]):
            load_generator_from_uri(model_uri, uri)
    with pytest.raises(RegistryError, match=REFUSAL[case]):
        fetch_verified(CHAMPION, tmp_path / "served", uri)
    args = ["sample", "--params", str(victim["params_file"]), "--out", str(tmp_path / "s.png")]
    assert main(args) == 1
    assert REFUSAL[case] in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "s.png").exists()


def test_a_model_with_code_in_its_mlmodel_is_refused(victim, tmp_path):
    """An MLmodel naming another loader, or code to put on the path (what older ganpipe
    versions logged), is never acted on by ganpipe itself."""
    local = fetch_verified(CHAMPION, tmp_path / "m", victim["uri"])
    mlmodel = Model.load(local)
    mlmodel.flavors["python_function"]["code"] = "code"
    mlmodel.save(local / "MLmodel")
    with pytest.raises(RegistryError, match=r"not a data-only ganpipe model .* and code"):
        load_generator_from_uri(str(local), victim["uri"])


def test_a_local_directory_without_its_registry_is_checked_against_its_own_digest(
    victim, tmp_path, caplog
):
    local = fetch_verified(CHAMPION, tmp_path / "m", victim["uri"])
    alone = f"sqlite:///{tmp_path / 'none.db'}"  # no tracking store knows the model
    with caplog.at_level(logging.WARNING):
        load_generator_from_uri(str(local), alone)
    assert "checked only against the digest in its own MLmodel file" in caplog.text
    assert not (tmp_path / "none.db").exists()  # asking did not create an empty store
    tamper("width", local, victim["other"], tmp_path / "marker")
    with pytest.raises(RegistryError, match="replaced or damaged"):
        load_generator_from_uri(str(local), alone)
    with mlflow_at(alone), pytest.raises(RegistryError, match="replaced or damaged"):
        mlflow.pyfunc.load_model(str(local))
    # A consistent forgery passes here, with the warning: only a registry can tell.
    tamper("swap", local, victim["other"], tmp_path / "marker")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_generator_from_uri(str(local), alone)
    assert "nothing ties these files to a registered version" in caplog.text
    with pytest.raises(RegistryError, match="replaced or damaged"):
        load_generator_from_uri(str(local), victim["uri"])  # the registry knows it


def test_a_version_registered_before_digests_is_refused(victim):
    client = MlflowClient(victim["uri"])
    client.delete_model_version_tag(NAME, "1", DIGEST_TAG)
    with pytest.raises(RegistryError, match="registered by an older ganpipe, whose models ship"):
        load_generator_from_uri(CHAMPION, victim["uri"])


@pytest.fixture(scope="module")
def champion(registry):
    with mlflow_at(registry["uri"]):
        return mlflow.pyfunc.load_model(CHAMPION)


BAD_REQUESTS = [
    ([1024] * 50 + [-50176], "record 50: num_images must be between 1 and 1024, got -50176"),
    ([2.5], r"record 0: num_images must be an integer, got 2.5 \(float\)"),
    ([True], r"record 0: num_images must be an integer, got True \(bool\)"),
    ([1, True], r"record 1: num_images must be an integer, got True \(bool\)"),
    (["3"], r"record 0: num_images must be an integer, got '3' \(str\)"),
    ([0], "record 0: num_images must be between 1 and 1024, got 0"),
    ([1024, 1], "the request asks for 1025 images in 2 records; between 1 and 1024"),
    ([1] * 1025, "the request asks for 1025 images in 1025 records"),
]


@pytest.mark.parametrize(("counts", "message"), BAD_REQUESTS)
def test_requests_are_checked_before_any_image_is_generated(champion, counts, message):
    calls = []
    hook = champion._model_impl.generator.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(MlflowException, match=message):
            champion.predict(pd.DataFrame({"num_images": counts, "seed": 0}))
    finally:
        hook.remove()
    assert calls == []  # nothing was generated


def test_seeds_labels_and_columns_are_checked(champion, registry):
    def refused(rows: list[dict], message: str) -> None:
        with pytest.raises(MlflowException, match=message):
            champion.predict(pd.DataFrame(rows))

    refused([{"num_images": 1, "seed": 0.5}], r"record 0: seed must be an integer, got 0.5")
    refused([{"num_images": 1, "seed": 0, "label": 3}], "record 0: label 3 given, but this ")
    refused([{"seed": 0}], "num_images")  # MLflow's schema check (it drops unknown columns)
    with mlflow_at(registry["uri"]):
        conditional = mlflow.pyfunc.load_model(f"models:/{CONDITIONAL}@champion")
    with pytest.raises(MlflowException, match="record 1: label 10 is outside the model's"):
        conditional.predict(pd.DataFrame({"num_images": [1, 1], "seed": 0, "label": [1, 10]}))
    with pytest.raises(MlflowException, match="record 0: label is missing: give it in every"):
        conditional.predict(
            pd.DataFrame([{"num_images": 1, "seed": 0}, {"num_images": 1, "seed": 0, "label": 2}])
        )


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextlib.contextmanager
def serve(model_uri: str, env: dict, tmp_path: Path):
    """`mlflow models serve` of `model_uri` on a free loopback port (pickle loading off), as a
    user starts it; yields `post(body) -> (status, json)` for /invocations. The server and its
    uvicorn workers are stopped on exit."""
    port = free_port()
    env = {**os.environ, **env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/ping", server, tmp_path / "serve.log")
        yield lambda body: _post(f"{base}/invocations", body)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_mlflow_models_serve_answers_requests(registry, tmp_path):
    with serve(CHAMPION, {"MLFLOW_TRACKING_URI": registry["uri"]}, tmp_path) as post:
        status, body = post({"dataframe_records": [{"num_images": 2, "seed": 0}]})
        assert status == 200, body
        images = np.asarray(body["predictions"], dtype=np.float32)
        assert images.shape == (2, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
        g = ganpipe.load(CHAMPION, registry["uri"])
        np.testing.assert_allclose(images, g.sample(2, seed=0).numpy(), atol=1e-6)
        # the sampling tools over HTTP: truncation, and a record of interpolation frames
        tools = [
            {"num_images": 2, "seed": 0, "truncation": 0.5},
            {"num_images": 2, "seed": 0, "truncation": 1},
        ]
        walk = {"num_images": 4, "seed": 1, "interpolate_to_seed": 2, "interpolation": "lerp"}
        for records, expected in (
            (tools, torch.cat([g.sample(2, 0, truncation=0.5), g.sample(2, 0)])),
            ([walk], g.interpolate(1, 2, steps=4, method="lerp")),
        ):
            status, body = post({"dataframe_records": records})
            assert status == 200, body
            np.testing.assert_allclose(body["predictions"], expected.numpy(), atol=1e-6)
        status, body = post({"dataframe_records": [{**tools[0], "truncation": 2}]})
        assert status == 400 and "truncation must be from 0 to 1" in body["message"], body
        status, body = post({"dataframe_records": [{"num_images": 5000, "seed": 0}]})
        assert status == 400 and "between 1 and 1024" in body["message"]
        # MLflow casts nothing: the model sees 2.5, true and the negative record as sent.
        for counts, message in BAD_REQUESTS[:3]:
            records = [{"num_images": n, "seed": 0} for n in counts]
            status, body = post({"dataframe_records": records})
            assert status == 400 and re.search(message, body["message"]), body


def _wait_for(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout_s} s"
            time.sleep(0.5)


def test_cli_register_and_sample(registry, tmp_path, capsys):
    params = registry["params"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    out_file = Path(params.register.out_file)
    out_file.unlink(missing_ok=True)
    assert main(["register", "--params", str(params_file)]) == 0
    assert json.loads(out_file.read_text())["version"] == 1
    assert "already registered as version 1" in capsys.readouterr().out

    png = tmp_path / "samples.png"
    args = ["sample", "--params", str(params_file), "--num", "4", "--nrow", "2", "--out", str(png)]
    assert main(args) == 0
    assert Image.open(png).size == (2 * 18 + 2, 2 * 18 + 2)
    assert main([*args, "--model", f"models:/{NAME}@nope"]) == 1
    assert "has no alias 'nope'" in capsys.readouterr().err


def write_params(registry, tmp_path) -> Path:
    """The registry's params as a params file for the CLI."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(registry["params"].model_dump(mode="json")))
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_truncation_is_applied_alike_from_python_the_served_model_and_the_cli(
    registry, champion, tmp_path, capsys
):
    g = ganpipe.load(CHAMPION, registry["uri"])
    plain = g.sample(4, seed=7)
    assert torch.equal(plain, g.sample(4, seed=7, truncation=1.0))
    z, _ = fixed_latents(4, g.spec.z_dim, seed=7)
    with torch.no_grad():  # psi * z through the network itself, mapped to [0, 1]
        expected = ((g.generator(0.5 * z, None) + 1) / 2).clamp(0, 1)
    truncated = g.sample(4, seed=7, truncation=0.5)
    assert torch.equal(truncated, expected) and not torch.equal(truncated, plain)
    # the served model: old clients (no column) get the untruncated images
    served = champion.predict(pd.DataFrame([{"num_images": 4, "seed": 7}]))
    np.testing.assert_array_equal(served, plain.numpy())
    rows = pd.DataFrame({"num_images": [4, 4], "seed": 7, "truncation": [0.5, 1]})
    np.testing.assert_array_equal(champion.predict(rows), torch.cat([truncated, plain]).numpy())
    # the CLI writes the same images
    params_file, out = write_params(registry, tmp_path), tmp_path / "psi.png"
    args = ["sample", "--params", str(params_file), "--num", "4", "--seed", "7", "--out", str(out)]
    assert main([*args, "--truncation", "0.5"]) == 0
    assert "(seed 7, truncation 0.5)" in capsys.readouterr().out
    reference = ganpipe.save_images(truncated, tmp_path / "reference.png")
    np.testing.assert_array_equal(pixels(out), pixels(reference))
    assert main(args) == 0
    assert not np.array_equal(pixels(out), pixels(reference))


def test_bad_truncation_is_refused_with_the_range(registry, champion, tmp_path, capsys):
    g = ganpipe.load(CHAMPION, registry["uri"])
    with pytest.raises(ValueError, match=f"{CHAMPION}: truncation must be from 0 to 1 .* 1.5"):
        g.sample(2, truncation=1.5)
    with pytest.raises(MlflowException, match="record 1: truncation must be from 0 to 1 .* -0.5"):
        champion.predict(pd.DataFrame({"num_images": 1, "seed": 0, "truncation": [1, -0.5]}))
    with pytest.raises(MlflowException, match=r"record 0: truncation must be a number .* 'x' \("):
        champion.predict(pd.DataFrame([{"num_images": 1, "seed": 0, "truncation": "x"}]))
    with pytest.raises(MlflowException, match=r"record 1: truncation is missing: give it in every"):
        champion.predict(
            pd.DataFrame(
                [{"num_images": 1, "seed": 0, "truncation": 0.5}, {"num_images": 1, "seed": 0}]
            )
        )
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--truncation", "1.5", "--out", str(tmp_path / "s.png")])
    assert exit_.value.code == 2
    assert "argument --truncation: truncation must be from 0 to 1" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_interpolation_ends_at_the_seeds_samples_from_python_the_served_model_and_the_cli(
    registry, champion, tmp_path, method
):
    g = ganpipe.load(CHAMPION, registry["uri"])
    frames = g.interpolate(1, 2, steps=5, method=method, truncation=0.7)
    assert frames.shape == (5, 1, 16, 16)
    for frame, seed in ((frames[0], 1), (frames[-1], 2)):  # to rounding: 5 images, not 1
        own = g.sample(1, seed=seed, truncation=0.7)[0]
        torch.testing.assert_close(frame, own, rtol=0, atol=1e-5)
    assert not torch.allclose(frames[2], frames[0], atol=1e-3)
    record = {
        "num_images": 5, "seed": 1, "interpolate_to_seed": 2, "interpolation": method,
        "truncation": 0.7,
    }  # fmt: skip
    np.testing.assert_array_equal(champion.predict(pd.DataFrame([record])), frames.numpy())
    args = ["interpolate", "--params", str(write_params(registry, tmp_path))]
    args += ["--from-seed", "1", "--to-seed", "2", "--steps", "5", "--method", method]
    assert main([*args, "--truncation", "0.7", "--out", str(tmp_path / "walk.gif")]) == 0
    gif = Image.open(tmp_path / "walk.gif")
    assert gif.n_frames == 5 and gif.size == (16, 16)
    expected = frames.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    for i in range(5):
        gif.seek(i)
        np.testing.assert_array_equal(np.asarray(gif.convert("L")), expected[i])
    assert main([*args, "--out", str(tmp_path / "walk.png")]) == 0
    assert Image.open(tmp_path / "walk.png").size == (5 * 18 + 2, 18 + 2)  # one row of 5


def test_interpolation_of_a_conditional_model_keeps_its_label(registry):
    g = ganpipe.load(f"models:/{CONDITIONAL}@champion", registry["uri"])
    threes = g.interpolate(4, 5, steps=3, label=3)
    torch.testing.assert_close(threes[-1], g.sample(1, seed=5, label=3)[0], rtol=0, atol=1e-5)
    assert not torch.allclose(threes, g.interpolate(4, 5, steps=3), atol=1e-3)  # class 0
    with pytest.raises(ValueError, match=r"label 10 is outside the model's classes 0..9"):
        g.interpolate(4, 5, label=10)


BAD_INTERPOLATIONS = [
    ({"interpolate_to_seed": 3, "interpolation": "cubic"}, "interpolation must be one of lerp, "),
    ({"interpolation": "lerp"}, "interpolation 'lerp' given without interpolate_to_seed"),
    ({"interpolate_to_seed": 2.5}, r"interpolate_to_seed must be an integer, got 2.5"),
    (
        {"interpolate_to_seed": 3, "num_images": 1},
        "an interpolation needs num_images of at least 2",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_INTERPOLATIONS)
def test_bad_interpolation_requests_are_refused(champion, fields, message):
    with pytest.raises(MlflowException, match=f"record 0: {message}"):
        champion.predict(pd.DataFrame([{"num_images": 4, "seed": 0, **fields}]))


def test_interpolation_is_in_every_record_or_none(champion):
    rows = [{"num_images": 4, "seed": 0, "interpolate_to_seed": 3}, {"num_images": 1, "seed": 1}]
    with pytest.raises(MlflowException, match="record 1: interpolate_to_seed is missing: give it"):
        champion.predict(pd.DataFrame(rows))
    # the frames of a request count toward its 1024 images
    with pytest.raises(MlflowException, match="the request asks for 1025 images in 2 records"):
        champion.predict(
            pd.DataFrame({"num_images": [1000, 25], "seed": 0, "interpolate_to_seed": 1})
        )


def test_the_front_door_refuses_what_the_task_does_not_take(registry, tmp_path, capsys):
    g = ganpipe.load(CHAMPION, registry["uri"])
    assert g.task.name == "unconditional" and g.spec.resolution == 16
    with pytest.raises(TypeError, match="task 'unconditional', which takes noise: use .sample"):
        g.translate(torch.zeros(1, 1, 16, 16))
    with pytest.raises(TypeError, match=r"use .sample\(\), not .prompt\(\)"):
        g.prompt("a seven")
    with pytest.raises(ValueError, match="expected a .png .* or a .gif .* not .jpg"):
        ganpipe.save_images(g.sample(2), tmp_path / "s.jpg")
    args = ["interpolate", "--from-seed", "0", "--to-seed", "1", "--out", str(tmp_path / "a.jpg")]
    assert main(args) == 2
    assert "--out" in capsys.readouterr().err


def test_a_model_whose_signature_predates_the_sampling_tools_says_they_are_dropped(
    registry, tmp_path, caplog
):
    local = local_copy(registry, tmp_path)
    mlmodel = Model.load(local)
    old = [c for c in mlmodel.signature.inputs.inputs if c.name in ("num_images", "seed", "label")]
    mlmodel.signature = ModelSignature(Schema(old), mlmodel.signature.outputs)
    mlmodel.save(local / "MLmodel")
    with mlflow_at(registry["uri"]), caplog.at_level(logging.WARNING):
        model = mlflow.pyfunc.load_model(str(local))
    assert "predates the request column(s) truncation, interpolate_to_seed, interpolation" in (
        caplog.text
    )
    # what the warning is about: MLflow drops the column, the images are untruncated
    truncated = model.predict(pd.DataFrame([{"num_images": 2, "seed": 0, "truncation": 0.5}]))
    plain = ganpipe.load(CHAMPION, registry["uri"]).sample(2, seed=0)
    np.testing.assert_array_equal(truncated, plain.numpy())
