"""Steps of the user's path on the real node, shared by the tests in tests/node/ and by
benchmarks/cluster: the chart, data at a URL in the cluster, the examples adjusted to a
two-core node, and reading `kubectl get` as a user reads it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.node import Node
from tests.cluster.objectstore import ObjectStore

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mlkube"
EXAMPLES = REPO / "examples" / "insurance"
RUNTIME = "docker.io/mlkube/runtime:0.1.0"
RELEASE_NS = "mlkube-system"
MLFLOW = f"http://mlkube-mlflow.{RELEASE_NS}.svc.cluster.local:5000"
# One insurance row, as a client would send it.
ROW = {"age": 40, "sex": "female", "bmi": 27.5, "children": 1, "smoker": "no",
       "region": "northwest"}  # fmt: skip


# The operator settings the lane installs with: KServe's mode, as docs/install.md says for
# a KServe in Standard mode; the alias polled every 5 s instead of 30, a rollout that is
# not Ready in 120 s (instead of 600) fails, and a warm RayCluster goes after 30 s unused
# (instead of 600), to keep tests short.
LANE_VALUES = (
    "--set", "operator.kserveDeploymentMode=Standard",
    "--set", "operator.aliasPollSeconds=5", "--set", "operator.rolloutTimeoutSeconds=120",
    "--set", "operator.warmClusterIdleSeconds=30",
)  # fmt: skip


def helm(node: Node, *args: str, timeout: float = 600) -> str:
    return node.control_plane.helm(*args, timeout=timeout).stdout


def release_installed(node: Node) -> bool:
    status = node.control_plane.helm("status", "mlkube", "-n", RELEASE_NS, check=False)
    return status.returncode == 0


def install_chart(node: Node) -> None:
    """`helm install` of charts/mlkube with its MLflow server, as docs/install.md says."""
    helm(node, "install", "mlkube", str(CHART), "-n", RELEASE_NS, "--create-namespace",
         "--set", "mlflow.enabled=true", *LANE_VALUES, "--wait", "--timeout", "5m")  # fmt: skip


def uninstall_chart(node: Node) -> None:
    """`helm uninstall`, then wait until the release's namespace is gone (a later install
    goes into the same one)."""
    helm(node, "uninstall", "mlkube", "-n", RELEASE_NS, "--wait", "--ignore-not-found")
    node.kubectl("delete", "namespace", RELEASE_NS, "--timeout=180s", check=False, timeout=190)


def serve_dataset(node: Node, namespace: str, csv_path: Path) -> str:
    """The user's data at an HTTP URL inside the cluster (a ConfigMap behind a Service)."""
    node.kubectl(
        "create", "configmap", "data", "-n", namespace, f"--from-file={csv_path.name}={csv_path}"
    )
    objects = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "data", "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": {"app": "data"}},
                "template": {
                    "metadata": {"labels": {"app": "data"}},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "web",
                                "image": RUNTIME,
                                "imagePullPolicy": "Never",
                                "command": ["python", "-m", "http.server", "8000",
                                            "--directory", "/data"],
                                "ports": [{"containerPort": 8000}],
                                "readinessProbe": {"tcpSocket": {"port": 8000}},
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            }
                        ],
                        "volumes": [{"name": "data", "configMap": {"name": "data"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "data", "namespace": namespace},
            "spec": {"selector": {"app": "data"}, "ports": [{"port": 8000}]},
        },
    ]  # fmt: skip
    node.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    node.kubectl("rollout", "status", "deploy/data", "-n", namespace, "--timeout=120s", timeout=130)
    return f"http://data.{namespace}.svc.cluster.local:8000/{csv_path.name}"


def secret(node: Node, namespace: str, name: str, data: dict[str, str]) -> None:
    literals = [f"--from-literal={k}={v}" for k, v in data.items()]
    node.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)


def s3_env_from(node: Node, namespace: str, store: ObjectStore) -> list[dict[str, Any]]:
    """What docs/object-storage.md has a team make in its namespace: the store's keys in the
    Secret `s3-credentials`, its address in the ConfigMap `s3`; the `envFrom` giving both."""
    keys = {"AWS_ACCESS_KEY_ID": store.access_key, "AWS_SECRET_ACCESS_KEY": store.secret_key}
    secret(node, namespace, "s3-credentials", keys)
    node.kubectl("create", "configmap", "s3", "-n", namespace,
                 f"--from-literal=AWS_ENDPOINT_URL={store.endpoint}",
                 "--from-literal=AWS_EC2_METADATA_DISABLED=true")  # fmt: skip
    return [{"secretRef": {"name": "s3-credentials"}}, {"configMapRef": {"name": "s3"}}]


def example(name: str, **changes: Any) -> dict[str, Any]:
    """An example manifest with the changes this small node needs (see docs/install.md)."""
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    for path, value in changes.items():
        target = manifest
        *parents, leaf = path.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return manifest


def insurance_rows(csv_path: Path, count: int) -> list[dict[str, Any]]:
    """The first rows of the insurance CSV as a client sends them (no target column)."""
    import csv

    with csv_path.open() as f:
        return [
            {k: (v if k in ("sex", "smoker", "region") else (float(v) if k == "bmi" else int(v)))
             for k, v in row.items() if k not in ("charges", "expenses")}
            for _, row in zip(range(count), csv.DictReader(f), strict=False)
        ]  # fmt: skip


def wait_for(node: Node, what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        node.assert_alive()
        last = check()
        if last:
            return last
        time.sleep(2)
    raise AssertionError(f"{what}: not reached in {timeout:.0f}s (last: {last!r})")


def get_columns(node: Node, kind: str, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get KIND NAME` as the user sees it: header -> value."""
    out = node.kubectl("get", kind, name, "-n", namespace).stdout.splitlines()
    header, row = out[0], out[1]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    cells = {}
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else None
        cells[header[start:end].strip()] = row[start:end].strip()
    return cells


def total(metrics: dict[str, float], name: str, label: str) -> float:
    """The sum of a Prometheus counter's samples that carry `label`."""
    return sum(v for k, v in metrics.items() if k.startswith(name + "{") and label in k)


def namespaced_leftovers(node: Node, namespace: str) -> list[str]:
    kinds = "deploy,rs,pod,svc,sa,role,rolebinding,configmap,secret,pvc,networkpolicy"
    names = node.kubectl("get", kinds, "-n", namespace, "-o", "name").stdout.split()
    defaults = {"serviceaccount/default", "configmap/kube-root-ca.crt"}
    return [n for n in names if n not in defaults]


def pod_logs(node: Node, namespace: str, name: str) -> str:
    return node.kubectl("logs", "-n", namespace, name, check=False).stdout


def pod_manifest(
    namespace: str,
    name: str,
    image: str,
    command: list[str],
    *,
    script: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A run-once pod as uid 10001; `script` is mounted at /script from the ConfigMap
    `<name>-script` (see `add_script`)."""
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": command,
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if script is not None:
        container["volumeMounts"] = [{"name": "script", "mountPath": "/script"}]
        spec["volumes"] = [{"name": "script", "configMap": {"name": f"{name}-script"}}]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if env and "MLFLOW_TRACKING_URI" in env:
        # The chart's NetworkPolicy lets only pods with this label reach its MLflow.
        metadata["labels"] = {"mlkube.io/mlflow-client": "true"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def add_script(node: Node, namespace: str, name: str, script: Path) -> list[str]:
    """Put `script` in the ConfigMap pod `name` mounts; returns its command line start."""
    node.kubectl(
        "create", "configmap", f"{name}-script", "-n", namespace,
        f"--from-file={script.name}={script}",
    )  # fmt: skip
    return ["python", f"/script/{script.name}"]


def start_sleeper(node: Node, namespace: str, name: str, timeout: float = 120) -> None:
    """A runtime-image pod that only sleeps, once it is Ready."""
    node.kubectl("run", name, "-n", namespace, f"--image={RUNTIME}", "--image-pull-policy=Never",
                 "--restart=Never", "--", "sleep", "3600")  # fmt: skip
    node.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
                 f"--timeout={int(timeout)}s", timeout=timeout + 10)  # fmt: skip


def pod_ended(node: Node, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Wait for the pod to end; returns {"phase", "logs"}."""
    deadline = time.monotonic() + timeout
    phase = ""
    while time.monotonic() < deadline:
        phase = node.kubectl(
            "get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.phase}"
        ).stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    return {"phase": phase, "logs": pod_logs(node, namespace, name)}


def run_pod(
    node: Node, namespace: str, name: str, image: str, command: list[str], timeout: float = 120
) -> dict[str, Any]:
    """Run a pod to completion; returns {"phase", "logs"}."""
    manifest = pod_manifest(namespace, name, image, command)
    node.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    return pod_ended(node, namespace, name, timeout)


def run_script_pod(
    node: Node,
    namespace: str,
    name: str,
    script: Path,
    args: list[str],
    *,
    image: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> dict[str, Any]:
    """Run `script` (mounted from a ConfigMap) with `args` in a pod to completion."""
    command = [*add_script(node, namespace, name, script), *args]
    manifest = pod_manifest(namespace, name, image, command, script=script, env=env)
    node.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    return pod_ended(node, namespace, name, timeout)


def register_outside_model(node: Node, namespace: str, model: str, data_uri: str) -> int:
    """A model registered from outside mlkube (pods/register_model.py, in a pod), owned by
    `namespace`; its version."""
    script = Path(__file__).resolve().parent / "pods" / "register_model.py"
    registered = run_script_pod(
        node, namespace, "register", script,
        [json.dumps({"model": model, "owner": namespace, "data": data_uri})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert registered["phase"] == "Succeeded", registered["logs"]
    version: int = json.loads(registered["logs"].strip().splitlines()[-1])["version"]
    return version


def start_load(node: Node, namespace: str, client: dict[str, Any]) -> None:
    """A pod `load` running pods/load_client.py with `client` as its argument."""
    script = Path(__file__).resolve().parent / "pods" / "load_client.py"
    command = [*add_script(node, namespace, "load", script), json.dumps(client)]
    manifest = pod_manifest(namespace, "load", RUNTIME, command, script=script)
    node.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    node.kubectl("wait", "--for=condition=Ready", "pod/load", "-n", namespace,
                 "--timeout=60s", timeout=70)  # fmt: skip


def load_result(node: Node, namespace: str, timeout: float = 120) -> dict[str, Any]:
    """What the `load` pod printed once it ended."""
    ended = pod_ended(node, namespace, "load", timeout)
    return dict(json.loads(ended["logs"].strip().splitlines()[-1]))


def small_trainingrun(uri: str, **changes: Any) -> dict[str, Any]:
    """The insurance example sized for the two-core node: 4 trials, no worker pods, a Ray
    head of 0.8 CPU that goes as soon as the job ends; `changes` as for `example`."""
    return example(
        "trainingrun.yaml",
        **{"spec.dataset.uri": uri, "spec.tuning.numTrials": 4, "spec.ray.workers": 0,
           "spec.ray.head": {"cpu": "800m", "memory": "3Gi"},
           "spec.ttlSecondsAfterFinished": 0, **changes},
    )  # fmt: skip


def trainingrun_ended(
    node: Node, namespace: str, name: str, timeout: float = 900
) -> dict[str, str]:
    """`kubectl get tr NAME` once its phase is Succeeded or Failed."""
    columns: dict[str, str] = wait_for(
        node, f"TrainingRun {name} ended",
        lambda: (c := get_columns(node, "tr", namespace, name))["PHASE"]
        in ("Succeeded", "Failed") and c,
        timeout=timeout,
    )  # fmt: skip
    return columns


def start_load_until_told(node: Node, namespace: str, url: str, model: str) -> None:
    """A client pod sending requests to `model` at `url` until `stop_load`."""
    start_load(node, namespace, {"url": url, "model": model, "row": ROW,
                                 "max_seconds": 1200, "stop_file": "/tmp/stop"})  # fmt: skip


def stop_load(node: Node, namespace: str) -> dict[str, Any]:
    """Stop the client pod of `start_load_until_told`; what it saw (see load_client.py)."""
    node.kubectl("exec", "load", "-n", namespace, "--", "touch", "/tmp/stop")
    return load_result(node, namespace)
