"""The node itself: pods run, cluster DNS and Services work, nothing leaves the machine,
and stopping the node leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from tests.cluster.node import CGROUP_NAME, Node, cgroup_v2_root, differences, machine_state
from tests.node.conftest import NodeSession
from tests.node.steps import RUNTIME, run_pod, start_sleeper

BLACKHOLE = "203.0.113.7"  # TEST-NET-3: no host there, and our guard drops it first


def python_pod(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def test_a_pod_runs_and_resolves_cluster_names(node: Node, namespace: str) -> None:
    result = run_pod(
        node,
        namespace,
        "dns",
        RUNTIME,
        python_pod(
            """
            import socket
            print("kubernetes", socket.gethostbyname("kubernetes.default.svc.cluster.local"))
            conn = socket.create_connection(("kubernetes.default.svc", 443), timeout=5)
            print("connected", conn.getpeername()[0])
            try:
                socket.gethostbyname("pypi.org")
                print("outside resolved")
            except OSError as e:
                print("outside not resolved")
            """
        ),
    )
    assert result["phase"] == "Succeeded", result
    assert "kubernetes 10.96.0.1" in result["logs"]
    assert "connected 10.96.0.1" in result["logs"]
    assert "outside not resolved" in result["logs"]


def test_a_service_spreads_requests_over_its_pods(node: Node, namespace: str) -> None:
    web = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "web",
                            "image": RUNTIME,
                            "imagePullPolicy": "Never",
                            "command": python_pod(
                                """
                                import http.server, socket
                                class H(http.server.BaseHTTPRequestHandler):
                                    def do_GET(self):
                                        body = socket.gethostname().encode()
                                        self.send_response(200)
                                        self.send_header("content-length", str(len(body)))
                                        self.end_headers()
                                        self.wfile.write(body)
                                http.server.ThreadingHTTPServer(("", 8000), H).serve_forever()
                                """
                            ),
                            "ports": [{"containerPort": 8000}],
                            "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1},
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]},
    }
    node.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [web, service]}),
    )
    node.kubectl("rollout", "status", "-n", namespace, "deploy/web", "--timeout=120s", timeout=130)
    result = run_pod(
        node,
        namespace,
        "client",
        RUNTIME,
        python_pod(
            f"""
            import time, urllib.request
            # Until both pods answered: kube-proxy may program the second endpoint a moment
            # after the rollout reports both ready (seen once: 40 requests, one backend).
            seen, sent, deadline = set(), 0, time.monotonic() + 60
            while len(seen) < 2 and time.monotonic() < deadline:
                url = "http://web.{namespace}.svc.cluster.local/"
                seen.add(urllib.request.urlopen(url, timeout=5).read().decode())
                sent += 1
            print("backends", len(seen), "after", sent, "requests")
            """
        ),
    )
    assert result["phase"] == "Succeeded", result
    assert "backends 2 " in result["logs"], result["logs"]


@pytest.mark.expects_escape
def test_pod_traffic_beyond_the_machine_is_dropped_and_recorded(node: Node, namespace: str) -> None:
    assert node.escaped() == [], "an earlier test's escape went unnoticed"
    result = run_pod(
        node,
        namespace,
        "escape",
        RUNTIME,
        python_pod(
            f"""
            import socket
            try:
                socket.create_connection(("{BLACKHOLE}", 9), timeout=3)
                print("connected")
            except OSError as e:
                print("blocked", type(e).__name__)
            """
        ),
    )
    assert result["phase"] == "Succeeded", result
    assert "blocked" in result["logs"]
    assert f"{BLACKHOLE} tcp 9" in node.escaped()
    node.forget_escapes()


@pytest.mark.expects_escape
def test_node_daemon_traffic_beyond_the_machine_is_dropped_and_recorded(node: Node) -> None:
    """What the kubelet would do if it looked a node name up in the machine's DNS, or
    called out: a process in the node daemons' cgroup tries both."""
    assert node.escaped() == [], "an earlier test's escape went unnoticed"
    v2 = cgroup_v2_root()
    assert v2 is not None
    script = (
        f"echo $$ > {v2 / CGROUP_NAME / 'cgroup.procs'}; "
        f"timeout 3 bash -c 'exec 3<>/dev/tcp/{BLACKHOLE}/9' && echo connected || echo blocked; "
        "timeout 3 getent hosts pypi.org >/dev/null && echo resolved || echo unresolved"
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert "blocked" in out.stdout and "unresolved" in out.stdout, out
    escaped = node.escaped()
    assert f"{BLACKHOLE} tcp 9" in escaped
    assert any(e.endswith("udp 53") for e in escaped), escaped  # the machine's resolver
    node.forget_escapes()


def test_kubectl_logs_reach_the_kubelet_without_a_name_lookup(node: Node, namespace: str) -> None:
    result = run_pod(node, namespace, "hello", RUNTIME, ["echo", "hello from a pod"])
    assert result["phase"] == "Succeeded"
    assert result["logs"].strip() == "hello from a pod"


def test_stopping_the_node_leaves_nothing_behind(node: Node, node_session: NodeSession) -> None:
    """The lane's last test (see conftest.LANE_ORDER); a test after it starts the node again."""
    # A pod still running when the node stops.
    start_sleeper(node, "default", "sleeper", timeout=60)
    node_session.stop()
    assert differences(node_session.before, machine_state()) == []
