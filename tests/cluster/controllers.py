"""The real KubeRay operator and KServe controller for the test node, run as processes of
the node (tests/cluster/node.py) with the CRDs, ConfigMap and webhooks of the same version,
all taken from their Go modules by build.sh.

Both run on the host, not in pods: no registry holds their images here, and a host process
reaches what they need (the API server, and through it the Ray dashboard). They sit in the
node's cgroup, so the node's guard sees every packet they send.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mlkube.local import free_port
from tests.cluster.controlplane import ManagedProcess, _pinned, binaries_dir
from tests.cluster.node import HOST_IP, Node, _http_status

HERE = Path(__file__).resolve().parent
KSERVE_NAMESPACE = "kserve"


def kuberay_version() -> str:
    return _pinned(HERE / "kuberay" / "go.mod", "github.com/ray-project/kuberay/ray-operator")


def kserve_version() -> str:
    return _pinned(HERE / "kserve" / "go.mod", "github.com/kserve/kserve")


def _manifest_dir(name: str, version: str) -> Path:
    path = binaries_dir() / f"{name}-{version}"
    if not (path / ".complete").exists():
        raise FileNotFoundError(f"{path} is missing: run `make k8s-binaries`")
    return path


def kuberay_crds() -> list[Path]:
    return sorted((_manifest_dir("kuberay", kuberay_version()) / "config/crd/bases").glob("*.yaml"))


def kserve_crds() -> list[Path]:
    root = _manifest_dir("kserve", kserve_version()) / "config/crd/full"
    return sorted(p for p in root.rglob("*.yaml") if p.name.startswith("serving.kserve.io_"))


def apply_crds(node: Node, files: list[Path]) -> None:
    from tests.cluster.crds import install

    install(node.control_plane, files, timeout=300)


def _wait_healthy(node: Node, proc: ManagedProcess, url: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while _http_status(url) != 200:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} not healthy in {timeout}s:\n{proc.log_tail()}")
        time.sleep(0.5)


def start_kuberay(node: Node) -> ManagedProcess:
    """The KubeRay operator, watching every namespace."""
    apply_crds(node, kuberay_crds())
    probe = free_port()
    proc = node.spawn(
        "kuberay-operator",
        [
            binaries_dir() / "kuberay-operator",
            f"--metrics-addr=127.0.0.1:{free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{probe}",
            "--enable-leader-election=false",
            # The operator talks to each Ray head's dashboard; through the API server it needs
            # no cluster DNS (a host process would ask the machine's resolver instead).
            "--use-kubernetes-proxy",
            "--log-stdout-encoder=console",
        ],
        env={**os.environ, "KUBECONFIG": str(node.kubeconfig)},
    )
    _wait_healthy(node, proc, f"http://127.0.0.1:{probe}/healthz")
    return proc


def kserve_config(source: Path) -> dict[str, Any]:
    """KServe's own inferenceservice-config, set for this node: raw Deployments (no Knative
    or Istio here), no Ingress, and small default requests (the node has two cores)."""
    docs = [d for d in yaml.safe_load_all(source.read_text()) if d]
    config = next(d for d in docs if d.get("kind") == "ConfigMap")
    data = config["data"]
    data.pop("_example", None)
    data["deploy"] = json.dumps({"defaultDeploymentMode": "Standard"})
    ingress = json.loads(data["ingress"])
    ingress["disableIngressCreation"] = True
    ingress["disableIstioVirtualHost"] = True
    # No Ingress here: status.url names the predictor's Service, reachable in the cluster.
    ingress["ingressDomain"] = "cluster.local"
    ingress["domainTemplate"] = "{{ .Name }}-predictor.{{ .Namespace }}.svc.{{ .IngressDomain }}"
    data["ingress"] = json.dumps(ingress)
    isvc = json.loads(re.sub(r"//.*", "", data.get("inferenceService", "{}")) or "{}")
    isvc["resource"] = {
        "cpuRequest": "100m",
        "cpuLimit": "1",
        "memoryRequest": "256Mi",
        "memoryLimit": "2Gi",
    }
    data["inferenceService"] = json.dumps(isvc)
    config["metadata"] = {"name": "inferenceservice-config", "namespace": KSERVE_NAMESPACE}
    return dict(config)


def webhook_configurations(source: Path, url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """KServe's webhook configurations, pointed at `url` (the controller on the host)
    instead of its in-cluster Service, with our CA."""
    import base64

    bundle = base64.b64encode(ca_pem).decode()
    out = []
    for doc in yaml.safe_load_all(source.read_text()):
        if not doc or not doc.get("kind", "").endswith("WebhookConfiguration"):
            continue
        doc["metadata"] = {"name": doc["metadata"]["name"]}
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": bundle}
        out.append(doc)
    return out


def start_kserve(node: Node) -> ManagedProcess:
    """The KServe controller in Standard (raw Deployment) mode, with its webhooks."""
    root = _manifest_dir("kserve", kserve_version())
    apply_crds(node, kserve_crds())
    cp = node.control_plane
    node.kubectl("create", "namespace", KSERVE_NAMESPACE, check=False)
    node.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=json.dumps(kserve_config(root / "config/configmap/inferenceservice.yaml")),
    )
    # controller-runtime reads its webhook certificate from $TMPDIR/k8s-webhook-server/.
    tmp = node.workdir / "kserve-tmp"
    certs = tmp / "k8s-webhook-server" / "serving-certs"
    certs.mkdir(parents=True)
    serving = cp.ca.issue("kserve-webhook", server=True, ips=[HOST_IP])
    (certs / "tls.crt").write_bytes(serving.cert_pem)
    (certs / "tls.key").write_bytes(serving.key_pem)
    (certs / "tls.key").chmod(0o600)
    webhook_port, probe = free_port(), free_port()
    proc = node.spawn(
        "kserve-manager",
        [
            binaries_dir() / "kserve-manager",
            f"--metrics-addr=127.0.0.1:{free_port()}",
            f"--health-probe-addr=127.0.0.1:{probe}",
            f"--webhook-port={webhook_port}",
        ],
        env={
            **os.environ,
            "KUBECONFIG": str(node.kubeconfig),
            "TMPDIR": str(tmp),
            "POD_NAMESPACE": KSERVE_NAMESPACE,
        },
    )
    _wait_healthy(node, proc, f"http://127.0.0.1:{probe}/healthz")
    hooks = webhook_configurations(
        root / "config/webhook/manifests.yaml", f"https://{HOST_IP}:{webhook_port}", cp.ca.cert_pem
    )
    node.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": hooks}),
    )
    return proc
