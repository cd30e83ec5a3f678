"""The real test node, timed (needs root, `make k8s-binaries` and `make images`):

- node bring-up, cold (an empty image store: the images are imported) and warm;
- the real KubeRay and KServe controllers up, and `helm install` of the chart with MLflow;
- a TrainingRun (the insurance example, 4 trials, on this two-core node): `kubectl apply`
  to its first trial result (status.trials.completed >= 1) and to Succeeded;
- a ModelDeployment: `kubectl apply` to Ready, and to the first prediction answered
  through its Service (a v1 request from a running pod to its cluster DNS name).

Writes benchmarks/cluster/RESULTS.md.

    sudo .venv/bin/python -m benchmarks.cluster.run [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Runs in a pod: POST one row until the predictor answers; prints the last request's seconds.
POLL = """
import http.client, json, sys, time, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
body = json.dumps({"instances": [{"age": 40, "sex": "female", "bmi": 27.5, "children": 1,
                                  "smoker": "no", "region": "northwest"}]})
while True:
    # A short connect timeout: while no pod is ready, a connect can hang in SYN retries,
    # which would be counted as the request's own time.
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=1)
    try:
        connection.connect()
        connection.sock.settimeout(60)
        started = time.monotonic()
        connection.request("POST", url.path, body, {"content-type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        if answer.status == 200:
            print(time.monotonic() - started)
            break
    except OSError:
        pass
    finally:
        connection.close()
    time.sleep(0.1)
"""
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _setup_env() -> None:
    # Same offline switches and private HOME as the tests; the guard stays active.
    from mlkube.local import OFFLINE_ENV

    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("MLKUBE_K8S_CACHE", str(Path.home() / ".cache" / "mlkube"))
    os.environ["HOME"] = tempfile.mkdtemp(prefix="mlkube-bench-home-")


def seconds_until(check: Any, timeout: float, poll: float = 0.5) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(poll)
    raise TimeoutError(f"not reached in {timeout}s")


def bring_up(images: list[Path], *, cold: bool) -> tuple[Any, float]:
    from tests.cluster.node import Node, cache_root

    if cold:
        shutil.rmtree(cache_root() / "node" / "containerd", ignore_errors=True)
    started = time.monotonic()
    node = Node(images=images).start()
    return node, time.monotonic() - started


def raise_if_escaped(node: Any) -> None:
    escaped = node.escaped()
    if escaped:
        raise RuntimeError(f"traffic beyond the machine: {escaped}")


@contextlib.contextmanager
def bench_namespace(shared: Path, *chart_values: str) -> Iterator[tuple[Any, str, str]]:
    """A warm node with the real KubeRay and KServe and the chart installed (the lane's
    values, then `chart_values`), and a namespace `bench` with the insurance data served in
    it: (node, namespace, the data's URI). After the block: no traffic may have left the
    machine; the node is stopped either way."""
    from tests.cluster.controllers import start_kserve, start_kuberay
    from tests.cluster.images import image_archives
    from tests.node.steps import CHART, LANE_VALUES, RELEASE_NS, helm, serve_dataset

    node, _ = bring_up(list(image_archives().values()), cold=False)
    try:
        start_kuberay(node)
        start_kserve(node)
        helm(node, "install", "mlkube", str(CHART), "-n", RELEASE_NS, "--create-namespace",
             "--set", "mlflow.enabled=true", *LANE_VALUES, *chart_values,
             "--wait", "--timeout", "5m")  # fmt: skip
        namespace = "bench"
        node.kubectl("create", "namespace", namespace)
        yield node, namespace, serve_dataset(node, namespace, shared / "data" / "insurance.csv")
        raise_if_escaped(node)
    finally:
        node.stop()


def round_trip(shared: Path) -> dict[str, float]:
    from tests.cluster.controllers import start_kserve, start_kuberay
    from tests.cluster.images import image_archives
    from tests.node.steps import (
        CHART,
        RELEASE_NS,
        example,
        helm,
        serve_dataset,
        small_trainingrun,
        start_sleeper,
    )

    images = list(image_archives().values())
    times: dict[str, float] = {}
    node, times["node up, cold (images imported)"] = bring_up(images, cold=True)
    print(f"  node up, cold: {times['node up, cold (images imported)']:.1f} s", file=sys.stderr)
    node.stop()
    node, times["node up, warm"] = bring_up(images, cold=False)
    try:
        started = time.monotonic()
        start_kuberay(node)
        start_kserve(node)
        times["KubeRay + KServe controllers up"] = time.monotonic() - started
        started = time.monotonic()
        helm(node, "install", "mlkube", str(CHART), "-n", RELEASE_NS, "--create-namespace",
             "--set", "mlflow.enabled=true", "--wait", "--timeout", "5m")  # fmt: skip
        times["helm install (operator + MLflow Ready)"] = time.monotonic() - started
        namespace = "bench"
        node.kubectl("create", "namespace", namespace)
        uri = serve_dataset(node, namespace, shared / "data" / "insurance.csv")
        run = small_trainingrun(uri)

        def tr_field(path: str) -> str:
            return node.kubectl(
                "get", "tr", "insurance", "-n", namespace, "-o", f"jsonpath={{{path}}}",
                check=False,
            ).stdout  # fmt: skip

        node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
        started = time.monotonic()
        seconds_until(lambda: int(tr_field(".status.trials.completed") or 0) >= 1, 900)
        times["TrainingRun: apply -> first trial result"] = time.monotonic() - started
        seconds_until(lambda: tr_field(".status.phase") in ("Succeeded", "Failed"), 900)
        times["TrainingRun: apply -> Succeeded"] = time.monotonic() - started
        if tr_field(".status.phase") != "Succeeded":
            raise RuntimeError("the TrainingRun failed")

        # The first prediction is asked for from a pod that is already running, through the
        # Service's cluster DNS name (the host's own traffic to Service IPs is dropped by the
        # node's guard before kube-proxy would translate it; see tests/cluster/README.md).
        start_sleeper(node, namespace, "poller")
        deployment = example(
            "modeldeployment.yaml",
            **{"spec.replicas": {"min": 1, "max": 1},
               "spec.resources": {"cpu": "500m", "memory": "1Gi"}},
        )  # fmt: skip
        url = (
            f"http://insurance-predictor.{namespace}.svc.cluster.local/v1/models/insurance:predict"
        )
        node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
        started = time.monotonic()
        poll = start_poll(node, namespace, url)

        def md_ready() -> bool:
            out = node.kubectl(
                "get", "md", "insurance", "-n", namespace, "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False,
            ).stdout  # fmt: skip
            return out == "True"

        seconds_until(md_ready, 600)
        times["ModelDeployment: apply -> Ready"] = time.monotonic() - started
        out, err = poll.communicate(timeout=600)
        if poll.returncode != 0:
            raise RuntimeError(f"no prediction: {err.strip()[-500:]}")
        times["ModelDeployment: apply -> first prediction"] = time.monotonic() - started
        times["  of which the first request (loads the model)"] = float(out.strip())
        times.update(container_restart(node, namespace, url))
        raise_if_escaped(node)
    finally:
        node.stop()
    return times


def start_poll(node: Any, namespace: str, url: str) -> subprocess.Popen[str]:
    """POLL in the running `poller` pod: it prints the seconds of its first answered request."""
    return subprocess.Popen(
        [str(node.control_plane.binaries.kubectl), f"--kubeconfig={node.kubeconfig}",
         "exec", "-n", namespace, "poller", "--", "python", "-c", POLL, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def container_restart(node: Any, namespace: str, url: str) -> dict[str, float]:
    """The predictor container killed from the host, as a crash would: the kubelet restarts
    it in the same pod, whose cache volume still holds the model's files (no download)."""
    pods = json.loads(node.kubectl(
        "get", "pods", "-n", namespace, "-l", "serving.kserve.io/inferenceservice=insurance",
        "-o", "json").stdout)["items"]  # fmt: skip
    # The serving pod: a replaced one may still be on its way out.
    (pod,) = [
        p for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and p["status"].get("containerStatuses", [{}])[0].get("ready")
    ]  # fmt: skip
    status = pod["status"]["containerStatuses"][0]
    node.ctr("tasks", "kill", "-s", "SIGKILL", status["containerID"].split("://", 1)[1])
    started = time.monotonic()
    poll = start_poll(node, namespace, url)

    def restarted_and_ready() -> bool:
        seen = node.kubectl(
            "get", "pod", pod["metadata"]["name"], "-n", namespace, "-o", "json", check=False
        ).stdout  # fmt: skip
        now = json.loads(seen)["status"]["containerStatuses"][0] if seen else {}
        return bool(now.get("restartCount", 0) > status["restartCount"] and now.get("ready"))

    times = {"predictor container killed -> Ready again": seconds_until(restarted_and_ready, 300)}
    out, err = poll.communicate(timeout=300)
    if poll.returncode != 0:
        raise RuntimeError(f"no prediction after the restart: {err.strip()[-500:]}")
    times["predictor container killed -> first prediction (model from the cache volume)"] = (
        time.monotonic() - started
    )
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster.run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    _setup_env()
    rounds: list[dict[str, float]] = []
    for n in range(args.rounds):
        print(f"round {n + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        rounds.append(round_trip(args.shared))
    lines = [
        "# Real node benchmark",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; median of {args.rounds} round(s). "
        "`python -m benchmarks.cluster.run`",
        "",
        "| step | seconds |",
        "| --- | ---: |",
    ]
    for name in rounds[0]:
        lines.append(f"| {name} | {statistics.median(r[name] for r in rounds):.1f} |")
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
