"""Faults on the real node: a predictor pod deleted while requests come."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.cluster.node import Node
from tests.node.steps import (
    ROW,
    example,
    get_columns,
    load_result,
    serve_dataset,
    small_trainingrun,
    start_load,
    trainingrun_ended,
    wait_for,
)

PODS = Path(__file__).resolve().parent / "pods"


def start_load_until_told(node: Node, namespace: str, url: str) -> None:
    start_load(node, namespace, {"url": url, "model": "insurance", "row": ROW,
                                 "max_seconds": 600, "stop_file": "/tmp/stop"})  # fmt: skip


def stop_load(node: Node, namespace: str) -> dict[str, object]:
    node.kubectl("exec", "load", "-n", namespace, "--", "touch", "/tmp/stop")
    return load_result(node, namespace)


def predictor_pods(node: Node, namespace: str) -> list[str]:
    """Predictor pods that are Ready and not being deleted."""
    pods = json.loads(
        node.kubectl(
            "get", "pods", "-n", namespace, "-l",
            "serving.kserve.io/inferenceservice=insurance", "-o", "json",
        ).stdout
    )["items"]  # fmt: skip
    return [
        pod["metadata"]["name"]
        for pod in pods
        if not pod["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True"
                for c in pod.get("status", {}).get("conditions", []))
    ]  # fmt: skip


def test_a_predictor_pod_deleted_under_load_costs_no_request_with_two_replicas(
    node: Node, namespace: str, release: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    run = small_trainingrun(uri, **{"spec.tuning.numTrials": 1})
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
    assert trainingrun_ended(node, namespace, "insurance")["PHASE"] == "Succeeded"
    deployment = example(
        "modeldeployment.yaml",
        **{"spec.model": {"name": "insurance", "version": 1},
           "spec.replicas": {"min": 2, "max": 2},
           "spec.resources": {"cpu": "300m", "memory": "1Gi"}},
    )  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    wait_for(
        node, "two predictor pods Ready",
        lambda: get_columns(node, "md", namespace, "insurance")["READY"] == "True"
        and len(predictor_pods(node, namespace)) == 2,
        timeout=300,
    )  # fmt: skip
    url = get_columns(node, "md", namespace, "insurance")["URL"]
    start_load_until_told(node, namespace, url)
    time.sleep(3)
    victim = predictor_pods(node, namespace)[0]
    node.kubectl("delete", "pod", victim, "-n", namespace, "--wait=true", "--timeout=120s",
                 timeout=130)  # fmt: skip
    wait_for(
        node, "a replacement pod serving",
        lambda: len([p for p in predictor_pods(node, namespace) if p != victim]) == 2,
        timeout=180,
    )  # fmt: skip
    time.sleep(5)
    seen = stop_load(node, namespace)
    assert seen["errors"] == 0, seen
    assert seen["requests"] > 100, seen
    assert len(seen["answers"]) == 1, seen  # one version throughout


def test_the_ray_head_deleted_mid_search_ends_the_run_failed_with_a_reason(
    node: Node, namespace: str, release: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    # Slow trials (1500 boosting rounds each), so that the search is still going.
    run = small_trainingrun(
        uri,
        **{
            "spec.tuning.numTrials": 12,
            "spec.tuning.searchSpace": {"max_iter": {"choice": [1500]}},
        },
    )
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))

    def trials_completed() -> int:
        out = node.kubectl("get", "tr", "insurance", "-n", namespace, "-o",
                           "jsonpath={.status.trials.completed}").stdout  # fmt: skip
        return int(out or 0)

    wait_for(node, "a first trial result", lambda: trials_completed() >= 1, timeout=600)
    node.kubectl("delete", "pod", "-n", namespace, "-l", "ray.io/node-type=head",
                 "--wait=false")  # fmt: skip
    ended = trainingrun_ended(node, namespace, "insurance", timeout=600)
    status = json.loads(
        node.kubectl("get", "tr", "insurance", "-n", namespace, "-o", "json").stdout
    )["status"]
    assert ended["PHASE"] == "Failed", status
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "False" and succeeded["reason"], succeeded
    assert status.get("message"), status
    assert ended["VERSION"] == "" and ended["PROMOTED"] == "", ended
