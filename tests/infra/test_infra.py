"""The deployment files under infra/: they parse, the cluster-launcher file passes Ray's own
validation, the KubeRay manifests carry what the operator needs, and every file agrees with
the others, with the installed Ray and MLflow, and with the variables the pipeline reads.

KubeRay's CRD schemas are about 1 MB each, so the operator's required fields are checked here
by hand, from the RayCluster / RayJob types of ray-operator/apis/ray/v1 (ray.io/v1).
"""

from __future__ import annotations

import configparser
import importlib.metadata
import ipaddress
import os
import re
import secrets
import shlex
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import free_port
from tests.conftest import REPO_ROOT, background, wait_until

INFRA = REPO_ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
TRACKING = INFRA / "tracking"
RAY_VERSION = importlib.metadata.version("ray")
MLFLOW_VERSION = importlib.metadata.version("mlflow")
IMAGE_DOCKERFILE = INFRA / "image" / "Dockerfile"

# Fields of ray.io/v1 objects (KubeRay's Go types): a key outside these is a typo that the
# API server would drop or refuse. REQUIRED: keys without `omitempty`, which older operators'
# CRDs list as required.
CLUSTER_SPEC_KEYS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs", "authOptions",
}  # fmt: skip
HEAD_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_REQUIRED = {"template", "rayStartParams"}
WORKER_KEYS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
WORKER_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
JOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip

# What the pipeline reads from the environment on a cluster node (pipeline/cluster.py,
# pipeline/tracking.py, MLflow's client and pyarrow's S3 filesystem).
CREDENTIALS = {
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
}  # fmt: skip
SETTINGS = {"MLFLOW_TRACKING_URI", "GANPIPE_STORAGE_PATH", "AWS_ENDPOINT_URL", "PYTHONPATH"}


def load_all(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def load(path: Path) -> dict:
    (document,) = load_all(path)
    return document


def manifests() -> dict[str, dict]:
    """Every object under infra/kuberay, by kind/name (generateName for RayJobs)."""
    found = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_all(path):
            meta = doc["metadata"]
            found[f"{doc['kind']}/{meta.get('name') or meta['generateName']}"] = doc
    return found


def cluster_specs() -> dict[str, dict]:
    """The two RayCluster specs: the long-lived cluster and the RayJob's own."""
    objects = manifests()
    return {
        "raycluster.yaml": objects["RayCluster/ganpipe"]["spec"],
        "rayjob.yaml": objects["RayJob/ganpipe-repro-"]["spec"]["rayClusterSpec"],
    }


def pod_specs() -> dict[str, dict]:
    """Every pod spec that runs the project's image."""
    pods = {"workspace pod": manifests()["Pod/ganpipe-workspace"]["spec"]}
    for source, spec in cluster_specs().items():
        pods[f"{source} head"] = spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            pods[f"{source} {group['groupName']}"] = group["template"]["spec"]
    return pods


def workspace_mount() -> str:
    """Where the workspace volume is mounted (the same path in every pod)."""
    mounts = {
        mount["mountPath"]
        for pod in pod_specs().values()
        for container in pod["containers"]
        for mount in container["volumeMounts"]
        if mount["name"] == "workspace"
    }
    assert len(mounts) == 1, f"the workspace is mounted at different paths: {mounts}"
    return mounts.pop()


def env_sources() -> dict[str, dict]:
    objects = manifests()
    return {
        "configmap": objects["ConfigMap/ganpipe-env"]["data"],
        "secret": objects["Secret/ganpipe-credentials"]["stringData"],
    }


def pipeline_num_workers() -> int:
    from pipeline.config import load_params

    return load_params(REPO_ROOT / "params.yaml").ray.num_workers


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


# ---- every file ------------------------------------------------------------------------------


def test_every_yaml_file_under_infra_parses():
    paths = sorted({*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")})
    names = {p.relative_to(INFRA).as_posix() for p in paths}
    assert {
        "cluster-launcher/aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
        "kuberay/workspace-pvc.yaml", "kuberay/ganpipe-env.yaml",
        "kuberay/secret.example.yaml", "tracking/compose.yaml",
    } <= names  # fmt: skip
    for path in paths:
        documents = load_all(path)
        assert documents, f"{path} is empty"
        assert all(isinstance(d, dict) for d in documents), f"{path}: a document is not a mapping"


# ---- the cluster launcher (VMs) ----------------------------------------------------------------


def test_launcher_config_passes_rays_validation():
    """What `ray up` runs before it talks to AWS: defaults filled in, then the JSON schema and
    the node-type checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(LAUNCHER)))


def test_launcher_validation_would_catch_a_misspelt_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)
    config["available_node_types"]["gpu"]["resource"] = {"GPU": 1}
    with pytest.raises(Exception, match="resource"):
        validate_config(prepare_config(config))


def test_launcher_head_schedules_nothing_and_gpu_workers_fit_a_run():
    config = load(LAUNCHER)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    capacity = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers)
    assert capacity >= pipeline_num_workers(), "too few GPUs for ray.num_workers"
    # Without an ImageId Ray picks its default Ubuntu 18.04 AMI, too old for CUDA 13 torch.
    assert all(t["node_config"].get("ImageId") for t in types.values())


def test_launcher_installs_the_installed_ray_and_the_project_from_the_shared_mount():
    config = load(LAUNCHER)
    commands = "\n".join(
        command
        for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                    "worker_setup_commands")
        for command in config[key]
    )  # fmt: skip
    pins = re.findall(r"\bray(?:\[[^\]]*\])?==([\w.]+)", commands)
    assert pins and set(pins) == {RAY_VERSION}
    mount = re.search(r"mount -t nfs4 .* (/\S+)\)", commands).group(1)
    checkout = f"{mount}/ganpipe"
    assert "git clone https://" in commands and f" {checkout}" in commands
    for setup in ("head_setup_commands", "worker_setup_commands"):
        install = " ".join(config[setup])
        assert f"-c {checkout}/constraints.txt" in install
        assert f"-e {checkout}" in install


# ---- KubeRay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_spec_has_what_the_operator_needs(source):
    spec = cluster_specs()[source]
    assert set(spec) <= CLUSTER_SPEC_KEYS, set(spec) - CLUSTER_SPEC_KEYS
    head = spec["headGroupSpec"]
    assert HEAD_REQUIRED <= set(head) <= HEAD_KEYS, set(head) ^ HEAD_KEYS
    # rayStartParams is map[string]string: `num-cpus: 0` (an int) is refused.
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must schedule no training"
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert WORKER_REQUIRED <= set(group) <= WORKER_KEYS, set(group) ^ WORKER_KEYS
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert gpus(container) >= 1, f"worker group {group['groupName']} has no GPU limit"
        # Kubernetes refuses extended resources whose request differs from the limit.
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    for group in [head, *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        # KubeRay treats the first container as the Ray container.
        assert group["template"]["spec"]["containers"][0]["image"]


def test_kuberay_objects_use_the_ray_io_v1_api():
    objects = manifests()
    assert objects["RayCluster/ganpipe"]["apiVersion"] == "ray.io/v1"
    assert objects["RayJob/ganpipe-repro-"]["apiVersion"] == "ray.io/v1"


def test_rayjob_runs_the_pipeline_in_the_workspace_and_cleans_up():
    job = manifests()["RayJob/ganpipe-repro-"]["spec"]
    assert set(job) <= JOB_SPEC_KEYS, set(job) - JOB_SPEC_KEYS
    assert ("rayClusterSpec" in job) != ("clusterSelector" in job)
    assert job["shutdownAfterJobFinishes"] is True
    # The head has num-cpus 0: an entrypoint asking for CPUs would leave the head.
    assert not job.get("entrypointNumCpus") and not job.get("entrypointNumGpus")
    # KubeRay's submitter runs `ray job submit ... -- ENTRYPOINT ;` through a shell: a shell
    # operator in the entrypoint would run its second half in the submitter pod.
    words = shlex.split(job["entrypoint"])
    assert not {"&&", "||", ";", "|"} & set(words) and not any(";" in w for w in words)
    assert words[:2] == ["dvc", "--cd"] and words[3:] == ["repro"]
    assert words[2] == f"{workspace_mount()}/ganpipe"


def test_rayjob_cluster_has_a_gpu_per_training_worker_from_the_start():
    spec = cluster_specs()["rayjob.yaml"]
    ready = sum(
        group["minReplicas"] * gpus(group["template"]["spec"]["containers"][0])
        for group in spec["workerGroupSpecs"]
    )
    assert ready >= pipeline_num_workers()
    assert not spec.get("enableInTreeAutoscaling"), "a fixed-size cluster needs no autoscaler"


def test_every_pod_mounts_the_shared_workspace_claim():
    objects = manifests()
    pvc = objects["PersistentVolumeClaim/ganpipe-workspace"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every node must mount it"
    assert workspace_mount()  # one path everywhere
    for name, pod in pod_specs().items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert mounted <= set(volumes), f"{name}: mounts undeclared {mounted - set(volumes)}"
        assert set(volumes) <= mounted, f"{name}: declares unused {set(volumes) - mounted}"
        claim = volumes["workspace"]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"], f"{name} mounts claim {claim}"


def test_all_pods_run_the_image_built_on_the_installed_ray():
    images = {c["image"] for pod in pod_specs().values() for c in pod["containers"]}
    assert len(images) == 1, f"driver and workers must run one image: {images}"
    assert images.pop().rpartition(":")[2] == image_tag()
    assert {s["rayVersion"] for s in cluster_specs().values()} == {RAY_VERSION}


def test_every_ray_pod_gets_settings_and_credentials():
    sources = env_sources()
    assert set(sources["secret"]) >= CREDENTIALS, CREDENTIALS - set(sources["secret"])
    assert set(sources["configmap"]) >= SETTINGS, SETTINGS - set(sources["configmap"])
    assert not CREDENTIALS & set(sources["configmap"]), "credentials belong in the Secret"
    # RAY_ADDRESS is Ray's to set (`ray job submit` gives the entrypoint the cluster's).
    assert "RAY_ADDRESS" not in {*sources["configmap"], *sources["secret"]}
    for name, pod in pod_specs().items():
        for container in pod["containers"]:
            refs = {(kind, ref[kind]["name"]) for ref in container["envFrom"] for kind in ref}
            expected = {("configMapRef", "ganpipe-env"), ("secretRef", "ganpipe-credentials")}
            assert refs == expected, name
    assert sources["configmap"]["PYTHONPATH"] == f"{workspace_mount()}/ganpipe"


def test_the_pipeline_reads_the_configured_tracking_server_and_storage(monkeypatch):
    """The ConfigMap's values, set as KubeRay sets them, are what the stages use."""
    from pipeline.cluster import STORAGE_ENV, storage_root
    from pipeline.config import validate_params
    from pipeline.tracking import tracking_uri

    settings = env_sources()["configmap"]
    for key in ("MLFLOW_TRACKING_URI", STORAGE_ENV):
        monkeypatch.setenv(key, settings[key])
    params = validate_params({})
    assert tracking_uri(params) == settings["MLFLOW_TRACKING_URI"]
    assert storage_root(params) == settings[STORAGE_ENV]


# ---- the image ---------------------------------------------------------------------------------


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), flags=re.M))


def image_tag() -> str:
    """The rayproject/ray tag the Dockerfile builds on, with its default build args."""
    args = dockerfile_args(IMAGE_DOCKERFILE)
    base = re.search(r"^FROM rayproject/ray:(\S+) AS ray$", IMAGE_DOCKERFILE.read_text(), re.M)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.group(1))


def test_image_is_built_on_the_installed_ray_version():
    assert dockerfile_args(IMAGE_DOCKERFILE)["RAY_VERSION"] == RAY_VERSION
    assert image_tag().startswith(f"{RAY_VERSION}-py3")
    text = IMAGE_DOCKERFILE.read_text()
    # The base image's `ray` user (uid 1000), the user every pod runs as.
    user = re.findall(r"^USER (\S+)", text, flags=re.M)[-1].split(":")[0]
    assert user == "1000"
    assert {str(p["securityContext"]["runAsUser"]) for p in pod_specs().values()} == {user}
    assert "-c constraints.txt" in text and "ray==${RAY_VERSION}" in text


def test_image_bakes_inception_weights_where_the_evaluate_stage_looks(monkeypatch):
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    text = IMAGE_DOCKERFILE.read_text()
    args = dockerfile_args(IMAGE_DOCKERFILE)
    assert args["INCEPTION_URL"] == URL_INCEPTION_V3
    for source in ("url", "context", "none"):
        assert re.search(rf"^FROM ray AS inception-{source}$", text, flags=re.M), source
    assert re.search(r"^FROM inception-\$\{INCEPTION_SOURCE\} AS inception$", text, flags=re.M)
    weights = os.path.basename(URL_INCEPTION_V3)
    assert f"/tmp/inception/{weights}" in text and f"{weights} /tmp/inception/" in text
    # pipeline.fidelity looks in torch.hub's cache: under the image's TORCH_HOME, that is
    # the directory the weights are copied to.
    torch_home = re.search(r"^ENV TORCH_HOME=(\S+)", text, flags=re.M).group(1)
    monkeypatch.setenv("TORCH_HOME", torch_home)
    destination = re.search(r"COPY --from=inception \S* ?/tmp/inception/ (\S+)", text).group(1)
    assert Path(destination.replace("${TORCH_HOME}", torch_home)) == Path(
        torch.hub.get_dir(), "checkpoints"
    )


def test_image_build_context_lets_in_exactly_what_pip_install_reads():
    import tomllib

    rules = [
        line.strip()
        for line in (INFRA / "image" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "an allow-list: everything else (.venv, data, runs) stays out"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "constraints.txt", project["project"]["readme"], *packages} <= allowed
    copied = re.findall(r"^COPY --chown=\S+ (.+) \S+$", IMAGE_DOCKERFILE.read_text(), flags=re.M)
    assert {name for line in copied for name in line.split()} <= allowed


# ---- the tracking server -----------------------------------------------------------------------


def compose() -> dict:
    return load(TRACKING / "compose.yaml")


def with_defaults(value: str) -> str:
    """A compose value with `${VAR:-default}` replaced by its default (unset .env)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def variable(value: str) -> str:
    """The name of the variable a compose value `${NAME...}` interpolates."""
    return re.fullmatch(r"\$\{(\w+)[^}]*\}", value).group(1)


def option(command: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    return value


def test_tracking_image_pins_the_installed_mlflow():
    dockerfile = TRACKING / "Dockerfile"
    version = dockerfile_args(dockerfile)["MLFLOW_VERSION"]
    assert version.split(".")[:2] == MLFLOW_VERSION.split(".")[:2]
    text = dockerfile.read_text()
    for package in ("Flask-WTF", "psycopg2-binary", "boto3"):  # basic-auth, postgres, S3
        assert f'"{package}==' in text, package
    assert compose()["services"]["mlflow"]["image"].endswith(f":{version}")


def test_compose_wires_postgres_minio_and_auth_into_mlflow():
    services = compose()["services"]
    assert {"postgres", "minio", "create-buckets", "mlflow"} <= set(services)
    server, db = services["mlflow"], services["postgres"]["environment"]
    command = server["command"]
    assert command[:2] == ["mlflow", "server"]
    assert option(command, "--backend-store-uri") == (
        f"postgresql://{db['POSTGRES_USER']}@postgres:5432/{db['POSTGRES_DB']}"
    )
    assert "--serve-artifacts" in command and option(command, "--app-name") == "basic-auth"
    bucket = option(command, "--artifacts-destination").removeprefix("s3://").split("/")[0]
    assert f"grant {bucket} " in services["create-buckets"]["command"][0]
    env = server["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert variable(env["PGPASSWORD"]) == variable(db["POSTGRES_PASSWORD"])
    mounts = dict(v.split(":")[:2] for v in server["volumes"])
    assert mounts["./basic_auth.ini"] == env["MLFLOW_AUTH_CONFIG_PATH"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    auth = configparser.ConfigParser()
    auth.read(TRACKING / "basic_auth.ini")
    auth_db = auth["mlflow"]["database_uri"]
    assert auth_db.startswith(f"postgresql://{db['POSTGRES_USER']}@postgres:5432/")
    init_sql = (TRACKING / "postgres" / "create-auth-db.sql").read_text()
    assert f"CREATE DATABASE {auth_db.rsplit('/', 1)[1]};" in init_sql


def test_compose_publishes_ports_only_on_internal_addresses():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host, _, _ = with_defaults(port).rpartition(":")[0].rpartition(":")
            assert host, f"{name} publishes {port} on every interface"
            address = ipaddress.ip_address(host)
            # 0.0.0.0 counts as private to ipaddress, but means every interface.
            assert not address.is_unspecified, f"{name} publishes {port} on every interface"
            assert address.is_loopback or address.is_private, f"{name}: {port}"
    assert "ports" not in compose()["services"]["postgres"]
    mlflow_port = with_defaults(compose()["services"]["mlflow"]["ports"][0])
    assert ipaddress.ip_address(mlflow_port.split(":")[0]).is_loopback


def test_compose_secrets_come_from_an_uncommitted_env_file():
    required = set(re.findall(r"\$\{(\w+):\?", (TRACKING / "compose.yaml").read_text()))
    example = dict(
        line.split("=", 1)
        for line in (TRACKING / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), required - set(example)
    secret = {k for k in example if re.search(r"PASSWORD|SECRET", k)}
    assert secret and all(example[k] == "" for k in secret), "no secret values in the example"
    assert ".env" in (TRACKING / ".gitignore").read_text().split()
    for service in compose()["services"].values():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{key} is written in compose.yaml"


def test_compose_server_flags_exist_in_the_installed_mlflow():
    from mlflow.cli import server

    flags = {opt for param in server.params for opt in param.opts}
    command = compose()["services"]["mlflow"]["command"]
    used = {arg.split("=")[0] for arg in command[2:]}
    assert used <= flags, used - flags


def test_auth_config_names_its_database_and_holds_no_secret():
    """MLflow's basic-auth settings; the database password comes from PGPASSWORD and the
    admin's from MLFLOW_AUTH_ADMIN_PASSWORD, so neither is in the file."""
    auth = configparser.ConfigParser()
    auth.read(TRACKING / "basic_auth.ini")
    section = auth["mlflow"]
    assert section["default_permission"] in {"READ", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    assert urllib.parse.urlsplit(section["database_uri"]).password is None
    assert "admin_password" not in section and section["admin_username"]
    assert section["authorization_function"] == (
        "mlflow.server.auth:authenticate_request_basic_auth"
    )


def get(url: str, auth: tuple[str, str] | None = None) -> int | None:
    """The HTTP status of a GET, None while nothing listens."""
    request = urllib.request.Request(url)
    if auth:
        import base64

        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # PBKDF2 is slow
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError):
        return None


# Two imports of MLflow (the CLI, then its uvicorn worker): ~20 s idle, minutes on a busy
# machine.
STARTUP_TIMEOUT_S = 300


@pytest.fixture
def basic_auth_server(tmp_path):
    """compose.yaml's `mlflow server` command on 127.0.0.1, its stores swapped for sqlite
    and a local directory; yields (url, admin password)."""
    pytest.importorskip("flask_wtf", reason="mlflow's basic-auth app needs Flask-WTF")
    auth = configparser.ConfigParser()
    auth.read(TRACKING / "basic_auth.ini")
    auth["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'auth.db'}"
    with open(tmp_path / "basic_auth.ini", "w") as f:
        auth.write(f)
    port = free_port()
    local = {
        "--host": "127.0.0.1", "--port": str(port), "--workers": "1",
        "--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination": (tmp_path / "artifacts").as_uri(),
    }  # fmt: skip
    command = [
        f"{arg.split('=')[0]}={local[arg.split('=')[0]]}" if arg.split("=")[0] in local else arg
        for arg in compose()["services"]["mlflow"]["command"]
    ]
    password = secrets.token_hex(12)
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)  # the admin is the config file's
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with background(command, env, log, cwd=tmp_path) as server:
        wait_until(lambda: get(f"{url}/health") == 200, "mlflow server", server, log,
                   STARTUP_TIMEOUT_S)  # fmt: skip
        yield url, password


@pytest.mark.slow
def test_basic_auth_server_refuses_anonymous_requests_and_admits_the_admin(basic_auth_server):
    url, password = basic_auth_server
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert get(api) == 401
    assert get(api, ("admin", "wrong-" + password)) == 401
    assert get(api, ("admin", password)) == 200
