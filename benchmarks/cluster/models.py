"""Ten small models on the real test node (needs root, `make k8s-binaries` and `make images`),
served two ways:

- one ModelDeployment listing all ten (spec.models): one InferenceService, one predictor;
- ten ModelDeployments of one model each: ten InferenceServices, ten predictors.

For each: predictor pods, their resident memory once every model answered one prediction
(the predictor process's RSS, read from /proc in each pod), `kubectl apply` to every
ModelDeployment Ready, and `kubectl apply` to the first prediction of every model (v1
requests from a running pod to the Services' cluster DNS names, each model asked until it
answers, in turn). The models: ten copies of the insurance pipeline (HistGradientBoosting,
50 iterations), registered from a pod as a team outside mlkube would (tests/node/pods/
register_model.py). The two ways run one after the other (the first is deleted, and its pods
gone, before the second starts), so that they never share the two cores. Writes
benchmarks/cluster/MODELS.md.

    sudo .venv/bin/python -m benchmarks.cluster.models [--models 10]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.cluster.run import REPO, _setup_env, bench_namespace, seconds_until

HERE = Path(__file__).resolve().parent
PODS = REPO / "tests" / "node" / "pods"
# Runs in a pod: for each URL in turn, POST one row until it answers.
POLL_ALL = """
import json, sys, time, urllib.request
body = json.dumps({"instances": [{"age": 40, "sex": "female", "bmi": 27.5, "children": 1,
                                  "smoker": "no", "region": "northwest"}]}).encode()
for url in sys.argv[1:]:
    while True:
        request = urllib.request.Request(url, data=body,
                                         headers={"content-type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).read()
            break
        except OSError:
            time.sleep(0.1)
print("done")
"""
# Runs in a predictor pod: the resident bytes of its server (PID 1).
RSS = "import os; print(int(open('/proc/1/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"
MIB = 2**20


def deployment(name: str, models: list[str], **spec: Any) -> dict[str, Any]:
    selectors = [{"name": model, "version": 1} for model in models]
    chosen = {"model": selectors[0]} if len(selectors) == 1 else {"models": selectors}
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {**chosen, "replicas": {"min": 1, "max": 1}, "ttlSeconds": 3600, **spec},
    }


def predictor_pods(node: Any, namespace: str) -> list[str]:
    out = node.kubectl(
        "get", "pods", "-n", namespace, "-l", "serving.kserve.io/inferenceservice", "-o",
        "jsonpath={.items[*].metadata.name}", check=False,
    ).stdout  # fmt: skip
    return [str(name) for name in out.split()]


def serve(
    node: Any, namespace: str, deployments: list[dict[str, Any]], urls: list[str]
) -> dict[str, float]:
    """Apply `deployments`, time them to Ready and to a first answer at each of `urls`;
    count the predictor pods and their memory; delete them and wait for their pods to go."""
    names = [d["metadata"]["name"] for d in deployments]
    manifest = {"apiVersion": "v1", "kind": "List", "items": deployments}
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    started = time.monotonic()
    poll = subprocess.Popen(
        [str(node.control_plane.binaries.kubectl), f"--kubeconfig={node.kubeconfig}",
         "exec", "-n", namespace, "poller", "--", "python", "-c", POLL_ALL, *urls],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def all_ready() -> bool:
        out = node.kubectl(
            "get", "md", "-n", namespace, "-o",
            'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}',
            check=False,
        ).stdout.split()  # fmt: skip
        return len(out) == len(names) and all(s == "True" for s in out)

    seconds_until(all_ready, 1800)
    ready = time.monotonic() - started
    _, err = poll.communicate(timeout=1800)
    if poll.returncode != 0:
        raise RuntimeError(f"no prediction: {err.strip()[-500:]}")
    answered = time.monotonic() - started
    pods = predictor_pods(node, namespace)
    rss = sum(
        int(node.kubectl("exec", "-n", namespace, pod, "-c", "kserve-container", "--",
                         "python", "-c", RSS).stdout.strip())
        for pod in pods
    )  # fmt: skip
    node.kubectl("delete", "md", "-n", namespace, *names, "--wait=true", timeout=600)
    seconds_until(lambda: not predictor_pods(node, namespace), 600)
    return {"pods": len(pods), "rss": rss / MIB, "ready": ready, "answered": answered}


def measure(shared: Path, count: int) -> dict[str, dict[str, float]]:
    from tests.node.steps import MLFLOW, RUNTIME, run_script_pod, start_sleeper

    with bench_namespace(shared) as (node, namespace, uri):
        models = [f"small-{n}" for n in range(count)]
        registered = run_script_pod(
            node, namespace, "register", PODS / "register_model.py",
            [json.dumps({"models": models, "owner": namespace, "data": uri})],
            image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW}, timeout=900,
        )  # fmt: skip
        if registered["phase"] != "Succeeded":
            raise RuntimeError(f"registering the models failed: {registered['logs'][-2000:]}")
        start_sleeper(node, namespace, "poller")
        results: dict[str, dict[str, float]] = {}

        def url(service: str, model: str) -> str:
            host = f"{service}-predictor.{namespace}.svc.cluster.local"
            return f"http://{host}/v1/models/{model}:predict"

        one = deployment("all", models, resources={"cpu": "500m", "memory": "1Gi"})
        results[f"1 ModelDeployment of {count} models"] = serve(
            node, namespace, [one], [url("all", m) for m in models]
        )
        each = [
            deployment(f"one-{n}", [m], resources={"cpu": "100m", "memory": "512Mi"})
            for n, m in enumerate(models)
        ]
        results[f"{count} ModelDeployments of 1 model"] = serve(
            node, namespace, each, [url(f"one-{n}", m) for n, m in enumerate(models)]
        )
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster.models")
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    _setup_env()
    results = measure(args.shared, args.models)
    lines = [
        f"# {args.models} small models: one InferenceService or one each (real node)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; one run each. `python -m benchmarks.cluster.models`",
        "",
        "| served as | predictor pods | predictor RSS (MiB) | apply -> all Ready (s) "
        "| apply -> every model answered (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['pods']:.0f} | {r['rss']:.0f} | {r['ready']:.1f} "
            f"| {r['answered']:.1f} |"
        )
    (HERE / "MODELS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
