"""Operator benchmark on the test control plane (etcd + kube-apiserver + GC, no kubelet).

Measures, with the operator as its own process (`python -m mlkube.operator run`):
- TrainingRun -> RayJob latency: TrainingRuns created one at a time; the time from the
  create call to the RayJob showing up on a watch (p50/p95; target p50 < 200 ms);
- a burst: N TrainingRuns created at once (16 client threads); the time until all N
  RayJobs exist (target < 60 s);
- the operator's memory: peak RSS (VmHWM) of its process (target < 200 MB).

Nothing plays KubeRay here: RayJobs stay unstarted, so MLflow is never asked.

    .venv/bin/python -m benchmarks.operator.run [--sequential 30] [--burst 200]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from mlkube.local import OFFLINE_ENV, free_port
from tests.cluster import crds
from tests.cluster.controlplane import ControlPlane

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NAMESPACE = "bench"


def trainingrun(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "task": "insurance",
            "dataset": {"uri": "../shared/data/insurance.csv"},
            "model": {"name": "bench"},
            "tuning": {"numTrials": 2},
        },
    }


class RayJobWatch:
    """Records when each RayJob is first seen (monotonic clock)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.seen: dict[str, float] = {}
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch().stream(
                self.custom.list_namespaced_custom_object,
                "ray.io", "v1", NAMESPACE, "rayjobs", timeout_seconds=2,
            )  # fmt: skip
            for event in stream:
                name = event["raw_object"]["metadata"]["name"]
                with self.changed:
                    self.seen.setdefault(name, time.monotonic())
                    self.changed.notify_all()

    def wait_for(self, names: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not names <= self.seen.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def reconciles(metrics: str) -> int:
    """Sum of mlkube_operator_reconciles_total over its labels."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("mlkube_operator_reconciles_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def start_operator(
    kubeconfig: Path, log: Path, metrics_port: int, health_port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "KUBECONFIG": str(kubeconfig),
        "MLKUBE_OPERATOR_METRICS_PORT": str(metrics_port),
        "MLKUBE_OPERATOR_HEALTH_PORT": str(health_port),
        "MLKUBE_OPERATOR_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLKUBE_OPERATOR_LOG_FORMAT": "plain",
        "PYTHONPATH": str(REPO),
    }
    argv = [sys.executable, "-m", "mlkube.operator", "run", "--namespace", NAMESPACE]
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(api: client.ApiClient, watcher: RayJobWatch, log: Path) -> None:
    """One warm-up TrainingRun: the operator is up once its RayJob appears."""
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(
        "mlkube.io", "v1alpha1", NAMESPACE, "trainingruns", trainingrun("warmup")
    )
    if not watcher.wait_for({"warmup"}, 120):
        raise SystemExit(f"operator did not come up; log:\n{log.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=30)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)

    with ControlPlane() as cp:
        crds.install_all(cp)
        api = cp.api_client()
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        log = Path(tempfile.mkdtemp(prefix="mlkube-bench-")) / "operator.log"
        metrics_port, health_port = free_port(), free_port()
        operator = start_operator(cp.kubeconfig, log, metrics_port, health_port)
        watcher = RayJobWatch(api)
        watcher.start()
        try:
            wait_ready(api, watcher, log)

            def create(name: str) -> float:
                started = time.monotonic()
                custom.create_namespaced_custom_object(
                    "mlkube.io", "v1alpha1", NAMESPACE, "trainingruns", trainingrun(name)
                )
                return started

            latencies = []
            for i in range(args.sequential):
                name = f"seq-{i}"
                started = create(name)
                if not watcher.wait_for({name}, 30):
                    raise SystemExit(f"no RayJob for {name} in 30 s")
                latencies.append((watcher.seen[name] - started) * 1000)

            names = [f"burst-{i}" for i in range(args.burst)]
            burst_started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(create, names))
            created_all = time.monotonic() - burst_started
            complete = watcher.wait_for(set(names), 120)
            burst_seconds = max(watcher.seen.get(n, float("inf")) for n in names) - burst_started
            rss, peak = peak_rss_mb(operator.pid)
            health_status, _ = get(f"http://127.0.0.1:{health_port}/healthz")
            _, metrics = get(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            watcher.stop()
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
        version = cp.version().get("gitVersion", "?")

    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[18] if len(latencies) >= 20 else max(latencies)
    rows = [
        ("TrainingRun -> RayJob p50", f"{p50:.0f} ms", "< 200 ms", p50 < 200),
        ("TrainingRun -> RayJob p95", f"{p95:.0f} ms", "", None),
        (f"{args.burst} at once: creates sent", f"{created_all:.1f} s", "", None),
        (f"{args.burst} at once: all RayJobs", f"{burst_seconds:.1f} s" if complete else
         "incomplete", "< 60 s", complete and burst_seconds < 60),
        ("operator RSS now / peak", f"{rss:.0f} / {peak:.0f} MB", "< 200 MB", peak < 200),
        ("GET /healthz", str(health_status), "200", health_status == 200),
        ("reconciles on /metrics", str(reconciles(metrics)), "", None),
    ]  # fmt: skip
    table = ["| measure | value | target | met |", "| --- | --- | --- | --- |"]
    for what, value, target, met in rows:
        mark = "" if met is None else ("yes" if met else "NO")
        table.append(f"| {what} | {value} | {target} | {mark} |")
    text = "\n".join(table)
    print(text)
    print(f"operator log: {log}")
    args.results.write_text(
        "# Operator benchmark\n\n"
        f"`python -m benchmarks.operator.run --sequential {args.sequential} --burst {args.burst}`"
        f" on the test control plane (Kubernetes {version}, etcd, no kubelet), "
        f"{os.cpu_count()} cores shared with other work; the operator as its own process "
        "(`python -m mlkube.operator run`), default settings.\n\n"
        f"{text}\n\n"
        "Latency: from just before the TrainingRun create call to the RayJob's ADDED event "
        "on a watch, TrainingRuns created one at a time. Burst: 16 client threads create "
        "the TrainingRuns; the time runs from the first create to the last RayJob seen. "
        "Memory: VmHWM of the operator process after the burst.\n"
    )
    return 0 if all(met is not False for *_, met in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
