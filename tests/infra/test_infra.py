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
import json
import os
import re
import secrets
import shlex
import subprocess
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
    images.add(ray_containers("rayjob.yaml")["submitter"]["image"])  # its `ray job submit`
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


# ---- who can reach the Ray head ----------------------------------------------------------------
# Whoever submits a Ray job runs code with the nodes' MLflow and S3 credentials: every shipped
# cluster turns Ray's token authentication on, and on Kubernetes a NetworkPolicy closes the
# head to everything but the cluster, the workspace, RayJob submitters and the operator.

AUTH_OPTIONS_KEYS = {"mode", "secretName", "enableK8sTokenAuth"}  # ray.io/v1 AuthOptions
TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
# Labels KubeRay puts on every Ray pod (labelPod in ray-operator/controllers/ray/common/pod.go);
# ray.io/cluster and ray.io/identifier carry the cluster's name, random for a RayJob's.
KUBERAY_POD_LABELS = {
    "ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
    "app.kubernetes.io/created-by": "kuberay-operator", "ray.io/cluster": "ganpipe-repro-x7k2p",
}  # fmt: skip
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}  # the Helm chart's pod label
NAMESPACE = "ganpipe"  # any: the manifests name none, so they land in the current one
ALL_PORTS = frozenset({"*"})


def ray_containers(source: str) -> dict[str, dict]:
    """The Ray container of the head and of every worker group (KubeRay's first container),
    and for the RayJob its submitter's."""
    spec = cluster_specs()[source]
    found = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in spec["workerGroupSpecs"]:
        found[group["groupName"]] = group["template"]["spec"]["containers"][0]
    if source == "rayjob.yaml":
        submitter = manifests()["RayJob/ganpipe-repro-"]["spec"]["submitterPodTemplate"]
        found["submitter"] = submitter["spec"]["containers"][0]
    return found


def token_env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", []) if e["name"].startswith("RAY_AUTH")}


def expect_token_env(where: str, container: dict, secret: str) -> None:
    env = token_env_of(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: no RAY_AUTH_MODE=token"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": secret, "key": TOKEN_SECRET_KEY}, f"{where}: RAY_AUTH_TOKEN is {ref}"


@pytest.mark.parametrize("source", ["raycluster.yaml", "rayjob.yaml"])
def test_every_kuberay_cluster_turns_ray_token_auth_on(source):
    auth = cluster_specs()[source].get("authOptions") or {}
    assert set(auth) <= AUTH_OPTIONS_KEYS, set(auth) - AUTH_OPTIONS_KEYS
    assert auth.get("mode") == "token", f"{source}: the Jobs API is open (authOptions.mode)"
    secret = auth["secretName"]  # one known Secret: the workspace pod and clients need it
    # Also on the containers, so an operator that ignores authOptions starts no open cluster.
    for name, container in ray_containers(source).items():
        expect_token_env(f"{source} {name}", container, secret)
    example = manifests()[f"Secret/{secret}"]["stringData"]
    # Empty in the example: applied as it is, Ray refuses to start instead of using a token
    # everyone can read in this repository.
    assert example == {TOKEN_SECRET_KEY: ""}


def test_the_workspace_pod_can_submit_jobs_with_the_token():
    secret = {s["authOptions"]["secretName"] for s in cluster_specs().values()}
    assert len(secret) == 1, f"the clusters use different tokens: {secret}"
    (container,) = manifests()["Pod/ganpipe-workspace"]["spec"]["containers"]
    expect_token_env("workspace pod", container, secret.pop())


def launcher_ray_starts(key: str) -> list[tuple[dict[str, str], list[str]]]:
    """Each `ray start` in the launcher's `key` commands: (the variables set on its command
    line, its arguments)."""
    found = []
    for command in load(LAUNCHER)[key]:
        for part in re.split(r";|&&|\|\|", command):
            words = shlex.split(part)
            env = {}
            while words and re.fullmatch(r"\w+=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if words[:2] == ["ray", "start"]:
                found.append((env, words[2:]))
    return found


def dashboard_host(args: list[str], default: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith("--dashboard-host="):
            return arg.split("=", 1)[1]
        if arg == "--dashboard-host":
            return args[i + 1]
    return default


def test_every_launcher_node_starts_ray_with_token_auth():
    heads = launcher_ray_starts("head_start_ray_commands")
    workers = launcher_ray_starts("worker_start_ray_commands")
    assert heads and workers and all("--head" in args for _, args in heads)
    for env, args in heads + workers:
        # On the command itself, not only in ~/.bashrc: without it this node runs open.
        assert env.get("RAY_AUTH_MODE") == "token", f"no RAY_AUTH_MODE=token: {args}"
    # The token: the file Ray reads by default, copied from the machine that runs `ray up`.
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    default = _get_default_token_path().relative_to(Path.home()).as_posix()  # .ray/auth_token
    config = load(LAUNCHER)
    remote_home = f"/home/{config['auth']['ssh_user']}"
    assert config["file_mounts"].get(f"{remote_home}/{default}") == f"~/{default}"


def kuberay_heads() -> dict[str, tuple[str, bool]]:
    """Each KubeRay head: (dashboard host, token auth on). KubeRay's default host is 0.0.0.0."""
    return {
        source: (
            spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0"),
            (spec.get("authOptions") or {}).get("mode") == "token",
        )
        for source, spec in cluster_specs().items()
    }


def test_no_dashboard_listens_on_every_interface_without_token_auth():
    heads = kuberay_heads()
    for n, (env, args) in enumerate(launcher_ray_starts("head_start_ray_commands")):
        heads[f"aws.yaml head {n}"] = (
            dashboard_host(args, "127.0.0.1"),  # `ray start`'s default
            env.get("RAY_AUTH_MODE") == "token",
        )
    assert len(heads) == 3, heads
    for where, (host, token_auth) in heads.items():
        every_interface = host in {"0.0.0.0", "::", ""}
        assert token_auth or not every_interface, f"{where}: dashboard on {host} without a token"


def network_policies() -> list[dict]:
    return [doc for doc in manifests().values() if doc["kind"] == "NetworkPolicy"]


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector, as far as these manifests use it (matchLabels only)."""
    assert set(selector) <= {"matchLabels"}, f"selector beyond matchLabels: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_admits(peer: dict, labels: dict, namespace: str) -> bool:
    """Whether one `from` peer of a policy in NAMESPACE admits a pod."""
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"peer {peer}: no ipBlock"
    if "namespaceSelector" in peer:
        names = peer["namespaceSelector"].get("matchLabels", {})
        # {} would mean every namespace: a namespace must be named.
        assert set(names) == {"kubernetes.io/metadata.name"}, f"peer {peer} names no namespace"
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}):
            return False
    elif namespace != NAMESPACE:
        return False
    return selects(peer.get("podSelector", {}), labels)


def admitted_ports(target: dict, source: dict, namespace: str = NAMESPACE) -> frozenset:
    """The ports of a pod labelled `target` that a pod labelled `source` in `namespace` may
    open, by the manifests' NetworkPolicies (ALL_PORTS when no policy selects the target)."""
    policies = [p["spec"] for p in network_policies() if selects(p["spec"]["podSelector"], target)]
    if not policies:
        return ALL_PORTS
    ports = set()
    for policy in policies:
        assert "Ingress" in policy["policyTypes"], policy
        for rule in policy.get("ingress", []):
            assert rule.get("from"), f"an ingress rule open to every source: {rule}"
            if any(peer_admits(peer, source, namespace) for peer in rule["from"]):
                if "ports" not in rule:
                    return ALL_PORTS
                ports |= {p["port"] for p in rule["ports"]}
    return frozenset(ports)


def test_network_policy_admits_only_the_cluster_workspace_and_operator_to_the_head():
    objects = manifests()
    head = {**KUBERAY_POD_LABELS, "ray.io/node-type": "head"}
    worker = {**KUBERAY_POD_LABELS, "ray.io/node-type": "worker"}
    assert any(selects(p["spec"]["podSelector"], head) for p in network_policies()), (
        "no NetworkPolicy selects the Ray head: every pod reaches its Jobs API"
    )
    workspace = objects["Pod/ganpipe-workspace"]["metadata"].get("labels", {})
    submitter = objects["RayJob/ganpipe-repro-"]["spec"]["submitterPodTemplate"]["metadata"]
    submitter = submitter.get("labels", {})
    (operator_namespace,) = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in network_policies() for rule in p["spec"].get("ingress", [])
        for peer in rule["from"] if "namespaceSelector" in peer
    }  # fmt: skip
    dashboard = {
        port["containerPort"]
        for spec in cluster_specs().values()
        for port in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        if port["name"] == "dashboard"
    }
    assert dashboard == {8265}
    assert admitted_ports(head, worker) == ALL_PORTS  # the cluster itself: GCS, raylets, ...
    assert admitted_ports(head, head) == ALL_PORTS
    assert admitted_ports(head, workspace) == dashboard
    assert admitted_ports(head, submitter) == dashboard
    assert admitted_ports(head, OPERATOR_LABELS, operator_namespace) == dashboard
    # Everyone else: nothing, whatever labels they copy from another namespace.
    assert admitted_ports(head, {"app": "notebook"}) == frozenset()
    assert admitted_ports(head, workspace, "other-team") == frozenset()
    assert admitted_ports(head, worker, "other-team") == frozenset()
    assert admitted_ports(head, OPERATOR_LABELS) == frozenset()  # not in the operator's namespace
    # Workers take connections from the cluster only.
    assert admitted_ports(worker, head) == ALL_PORTS
    assert admitted_ports(worker, workspace) == frozenset()
    # The README installs the operator where the policy expects it.
    readme = (INFRA / "README.md").read_text()
    assert re.search(rf"helm install kuberay-operator .*--namespace {operator_namespace}\b", readme)


def test_the_token_variables_are_the_ones_ray_reads(tmp_path):
    """Ray's own code, each case in a fresh process (Ray caches its configuration): with what
    the pods get, and with the launcher's file at Ray's default path, the header that
    `ray job submit`'s client sends (dashboard_sdk's SubmissionClient) carries the token; with
    the example Secret's empty token Ray refuses to go on."""
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    script = """if True:
        import json
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled,
        )
        from ray._raylet import AuthenticationTokenLoader
        try:
            AuthenticationTokenLoader.instance().has_token()
            print(json.dumps(get_auth_headers_if_auth_enabled({})))
        except Exception as exc:
            print(json.dumps({"refused": type(exc).__name__}))
    """

    def headers(home: Path, **env: str) -> dict:
        home.mkdir(exist_ok=True)
        base = {"PATH": os.environ["PATH"], "HOME": str(home), "RAY_AUTH_MODE": "token"}
        out = subprocess.run(
            [sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert headers(tmp_path / "pod", RAY_AUTH_TOKEN="s3cr3t") == {"authorization": "Bearer s3cr3t"}
    launcher = tmp_path / "vm"
    (launcher / ".ray").mkdir(parents=True)
    (launcher / ".ray" / "auth_token").write_text("from-file")
    assert headers(launcher) == {"authorization": "Bearer from-file"}
    assert headers(tmp_path / "empty", RAY_AUTH_TOKEN="") == {"refused": "AuthenticationError"}


def test_no_infra_file_pipes_a_download_into_a_shell():
    """`curl ... | sh` runs whatever the server sends that day: installers are pinned and
    checked. YAML is read parsed too, where a folded command may hide the pipe."""
    pipe = re.compile(r"\b(?:curl|wget)\b[^|;&\n]*\|\s*(?:sudo\s+)?(?:\S*/)?(?:ba|da|z)?sh\b")
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        texts = [path.read_text()]
        if path.suffix in {".yaml", ".yml"}:
            texts += [json.dumps(doc) for doc in load_all(path)]
        for text in texts:
            assert not pipe.search(text), f"{path}: {pipe.search(text).group(0)}"


def test_launcher_installs_uv_at_a_pinned_version_checked_by_hash():
    commands = load(LAUNCHER)["setup_commands"]
    (install,) = [c for c in commands if "uv==" in c]
    pin = re.search(r"'uv==(\d+\.\d+\.\d+) --hash=sha256:([0-9a-f]{64})'\s*> (\S+)", install)
    assert pin, f"uv is not pinned with a sha256: {install}"
    assert f"--require-hashes -r {pin.group(3)}" in install
    # Every later use of uv is the binary that pip installed (--user: ~/.local/bin).
    assert "--user" in install
    config = load(LAUNCHER)
    every = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
             for c in config[key]]  # fmt: skip
    uses = re.findall(r"(\S*)\buv (?:venv|pip)\b", "\n".join(every))
    assert uses and set(uses) == {"~/.local/bin/"}, uses


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
    assert urllib.parse.urlsplit(section["database_uri"]).password is None
    assert "admin_password" not in section and section["admin_username"]
    assert section["authorization_function"] == (
        "mlflow.server.auth:authenticate_request_basic_auth"
    )


def test_auth_config_gives_users_nothing_they_were_not_granted():
    """Any account that could EDIT what it did not create could move a registered model's
    alias and choose what `ganpipe sample` and `mlflow models serve` load; READ would still
    let every account download every model. The value must be one the installed MLflow knows."""
    from mlflow.server.auth.permissions import get_permission

    auth = configparser.ConfigParser()
    auth.read(TRACKING / "basic_auth.ini")
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    permission = get_permission(auth["mlflow"]["default_permission"])
    assert not (permission.can_read or permission.can_update or permission.can_manage)


def call(
    url: str, auth: tuple[str, str] | None = None, body: dict | None = None
) -> tuple[int | None, dict]:
    """The HTTP status and JSON answer of a GET, or of a POST of `body`; None while nothing
    listens."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        import base64

        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # PBKDF2 is slow
            text = response.read().decode()
            return response.status, json.loads(text) if text.startswith("{") else {}
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, ConnectionError):
        return None, {}


def get(url: str, auth: tuple[str, str] | None = None) -> int | None:
    """The HTTP status of a GET, None while nothing listens."""
    return call(url, auth)[0]


# Two imports of MLflow (the CLI, then its uvicorn worker): ~20 s idle, minutes on a busy
# machine.
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def basic_auth_server(tmp_path_factory):
    """compose.yaml's `mlflow server` command on 127.0.0.1, its stores swapped for sqlite
    and a local directory; yields (url, admin password). One server for this module's tests."""
    pytest.importorskip("flask_wtf", reason="mlflow's basic-auth app needs Flask-WTF")
    tmp_path = tmp_path_factory.mktemp("mlflow-basic-auth")
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


@pytest.mark.slow
def test_basic_auth_server_shows_a_user_only_what_it_created_or_was_granted(basic_auth_server):
    """default_permission = NO_PERMISSIONS on the real server: a second account cannot read
    the admin's experiment until the admin grants it (infra/README.md's command), and can
    read and use what it creates itself, as the pipeline's account does."""
    url, password = basic_auth_server
    admin, user = ("admin", password), (f"user-{secrets.token_hex(4)}", secrets.token_hex(12))
    api = f"{url}/api/2.0/mlflow"
    created = call(f"{api}/users/create", admin, {"username": user[0], "password": user[1]})
    assert created[0] == 200, created
    status, answer = call(f"{api}/experiments/create", admin, {"name": f"admin-{user[0]}"})
    assert status == 200
    admins = f"{api}/experiments/get?experiment_id={answer['experiment_id']}"
    assert get(admins, user) == 403
    status, answer = call(f"{api}/experiments/create", user, {"name": f"own-{user[0]}"})
    assert status == 200
    assert get(f"{api}/experiments/get?experiment_id={answer['experiment_id']}", user) == 200
    grant = {
        "username": user[0], "resource_type": "experiment",
        "resource_id": admins.rsplit("=", 1)[1], "permission": "READ",
    }  # fmt: skip
    assert call(f"{url}/api/3.0/mlflow/users/permissions/grant", admin, grant)[0] == 200
    assert get(admins, user) == 200
