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

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mlkube"
EXAMPLES = REPO / "examples" / "insurance"
RUNTIME = "docker.io/mlkube/runtime:0.1.0"
RELEASE_NS = "mlkube-system"
MLFLOW = f"http://mlkube-mlflow.{RELEASE_NS}.svc.cluster.local:5000"


def helm(node: Node, *args: str, timeout: float = 600) -> str:
    return node.control_plane.helm(*args, timeout=timeout).stdout


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


def run_pod(
    node: Node, namespace: str, name: str, image: str, command: list[str], timeout: float = 120
) -> dict[str, Any]:
    """Run a pod to completion; returns {"phase", "logs"}."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                }
            ],
        },
    }
    node.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    node.kubectl(
        "wait",
        "-n",
        namespace,
        f"pod/{name}",
        "--for=jsonpath={.status.phase}=Succeeded",
        f"--timeout={int(timeout)}s",
        check=False,
        timeout=timeout + 10,
    )
    phase = node.kubectl(
        "get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.phase}"
    ).stdout
    return {"phase": phase, "logs": pod_logs(node, namespace, name)}


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
    node.kubectl(
        "create", "configmap", f"{name}-script", "-n", namespace,
        f"--from-file={script.name}={script}",
    )  # fmt: skip
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", f"/script/{script.name}", *args],
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                    "volumeMounts": [{"name": "script", "mountPath": "/script"}],
                }
            ],
            "volumes": [{"name": "script", "configMap": {"name": f"{name}-script"}}],
        },
    }
    node.kubectl("apply", "-f", "-", input=json.dumps(manifest))
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
