"""A TrainingRun on a new Ray cluster against one on the operator's warm cluster, on the real
test node (needs root, `make k8s-binaries` and `make images`): `kubectl apply` to the first
trial result (status.trials.completed >= 1) and to Succeeded, for

- a new cluster (spec.ray.cluster omitted: KubeRay starts a head pod for the run);
- the first warm run (spec.ray.cluster.warm: true; the operator makes the warm cluster);
- warm runs on that cluster, already up.

The insurance example sized for the two-core node (4 trials, Ray head only), the chart's
MLflow, the operator's status poll at 1 s (so that both paths are read as soon as the
status changes; the default is 5 s). Writes benchmarks/cluster/WARM.md.

    sudo .venv/bin/python -m benchmarks.cluster.warm [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.cluster.run import REPO, _setup_env, bench_namespace, seconds_until

HERE = Path(__file__).resolve().parent


def timed_run(
    node: Any, namespace: str, name: str, manifest: dict[str, Any]
) -> tuple[float, float]:
    manifest = json.loads(json.dumps(manifest))
    manifest["metadata"]["name"] = name

    def field(path: str) -> str:
        return node.kubectl("get", "tr", name, "-n", namespace, "-o", f"jsonpath={{{path}}}",
                            check=False).stdout  # fmt: skip

    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    started = time.monotonic()
    seconds_until(lambda: int(field(".status.trials.completed") or 0) >= 1, 900, poll=0.2)
    first = time.monotonic() - started
    seconds_until(lambda: field(".status.phase") in ("Succeeded", "Failed"), 900, poll=0.2)
    done = time.monotonic() - started
    if field(".status.phase") != "Succeeded":
        raise RuntimeError(f"TrainingRun {name} failed: {field('.status.message')}")
    print(f"  {name}: first trial {first:.1f} s, Succeeded {done:.1f} s", file=sys.stderr)
    return first, done


def measure(shared: Path, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from tests.node.steps import small_trainingrun

    results: dict[str, list[tuple[float, float]]] = {"new": [], "warm, first": [], "warm": []}
    chart_values = ("--set", "operator.statusPollSeconds=1",
                    "--set", "operator.warmClusterIdleSeconds=3600")  # fmt: skip
    with bench_namespace(shared, *chart_values) as (node, namespace, uri):
        new = small_trainingrun(uri)
        warm = small_trainingrun(uri, **{"spec.ray.cluster": {"warm": True}})
        for n in range(rounds):
            results["new"].append(timed_run(node, namespace, f"new-{n}", new))
            # A new cluster's head goes once its job ended (ttl 0); wait so that the runs
            # never share the two cores.
            seconds_until(lambda: not node.kubectl(
                "get", "pods", "-n", namespace, "-l", "ray.io/node-type=head", "-o", "name"
            ).stdout.strip(), 300)  # fmt: skip
        results["warm, first"].append(timed_run(node, namespace, "warm-first", warm))
        for n in range(rounds):
            results["warm"].append(timed_run(node, namespace, f"warm-{n}", warm))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster.warm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args(argv)
    _setup_env()
    results = measure(args.shared, args.rounds)
    new_first = statistics.median(r[0] for r in results["new"])
    lines = [
        "# A TrainingRun on a new Ray cluster and on a warm one (real node)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; median of {args.rounds} run(s) each (the first warm "
        "run once). `python -m benchmarks.cluster.warm`",
        "",
        "| cluster | apply -> first trial result (s) | apply -> Succeeded (s) "
        "| first trial, x new |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        first = statistics.median(r[0] for r in runs)
        done = statistics.median(r[1] for r in runs)
        lines.append(f"| {name} | {first:.1f} | {done:.1f} | {new_first / first:.2f}x |")
    lines += ["", "Every run: " + "; ".join(
        f"{name} " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in runs)
        for name, runs in results.items())]  # fmt: skip
    (HERE / "WARM.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
