"""Faults on the real node: a predictor pod deleted while requests come."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    ROW,
    RUNTIME,
    example,
    get_columns,
    load_result,
    run_script_pod,
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


def stop_load(node: Node, namespace: str) -> dict[str, Any]:
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


def ready_since(node: Node, namespace: str, pod: str) -> float:
    """When the pod last became Ready (wall clock; pods and the test share the machine)."""
    import datetime as dt

    conditions = json.loads(node.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)[
        "status"
    ]["conditions"]
    ready = next(c for c in conditions if c["type"] == "Ready")
    return dt.datetime.fromisoformat(ready["lastTransitionTime"]).timestamp()


def delete_one_predictor_under_load(node: Node, namespace: str, url: str) -> dict[str, Any]:
    """Delete one Ready predictor pod while a client sends requests; once the replicas are
    back, what the client saw, plus when the deletion started and the replacement was Ready."""
    replicas = len(predictor_pods(node, namespace))
    start_load_until_told(node, namespace, url)
    time.sleep(3)
    victim = predictor_pods(node, namespace)[0]
    deleted_at = time.time()
    node.kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")
    serving = wait_for(
        node, "the replicas back",
        lambda: len(pods := [p for p in predictor_pods(node, namespace) if p != victim])
        == replicas and pods,
        timeout=180,
    )  # fmt: skip
    time.sleep(5)
    seen = stop_load(node, namespace)
    node.kubectl("delete", "pod", "load", "-n", namespace, "--wait=true", timeout=60)
    node.kubectl("delete", "configmap", "load-script", "-n", namespace)
    return {
        **seen,
        "deleted_at": deleted_at,
        "replacement_ready": max(ready_since(node, namespace, p) for p in serving),
    }


def test_a_predictor_pod_deleted_under_load_fails_requests_only_while_no_replica_is_ready(
    node: Node, namespace: str, release: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    run = small_trainingrun(uri, **{"spec.tuning.numTrials": 1})
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
    assert trainingrun_ended(node, namespace, "insurance")["PHASE"] == "Succeeded"

    def deploy(replicas: int) -> str:
        deployment = example(
            "modeldeployment.yaml",
            **{"spec.model": {"name": "insurance", "version": 1},
               "spec.replicas": {"min": replicas, "max": replicas},
               "spec.resources": {"cpu": "300m", "memory": "1Gi"}},
        )  # fmt: skip
        node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
        wait_for(
            node, f"{replicas} predictor pods Ready",
            lambda: get_columns(node, "md", namespace, "insurance")["READY"] == "True"
            and len(predictor_pods(node, namespace)) == replicas,
            timeout=300,
        )  # fmt: skip
        return get_columns(node, "md", namespace, "insurance")["URL"]

    # One replica: requests fail between its deletion and its replacement being Ready.
    alone = delete_one_predictor_under_load(node, namespace, deploy(1))
    assert alone["errors"] > 0, alone
    first, last = alone["error_window"]
    # Margins: Ready times have whole seconds, and kube-proxy routes to a pod shortly
    # after it is Ready.
    assert alone["deleted_at"] - 1 <= first and last <= alone["replacement_ready"] + 3, alone

    # Two replicas: the other one serves throughout.
    pair = delete_one_predictor_under_load(node, namespace, deploy(2))
    assert pair["errors"] == 0, pair
    assert pair["requests"] > 100, pair
    assert len(pair["answers"]) == 1, pair


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


def test_a_version_whose_artifacts_are_broken_never_takes_traffic(
    node: Node, namespace: str, release: str, shared_dir: Path
) -> None:
    """The champion alias moves to a version whose model file is damaged (it downloads but
    cannot load): its predictor pod never becomes Ready, the previous version answers every
    request, and the ModelDeployment says which version failed and that traffic stayed."""
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    run = small_trainingrun(uri, **{"spec.tuning.numTrials": 1})
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
    assert trainingrun_ended(node, namespace, "insurance")["PHASE"] == "Succeeded"
    deployment = example(
        "modeldeployment.yaml",
        **{"spec.replicas": {"min": 1, "max": 1},
           "spec.resources": {"cpu": "300m", "memory": "1Gi"}},
    )  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    wait_for(
        node, "ModelDeployment Ready with version 1",
        lambda: (c := get_columns(node, "md", namespace, "insurance"))["READY"] == "True"
        and c["VERSION"] == "1",
        timeout=300,
    )  # fmt: skip
    url = get_columns(node, "md", namespace, "insurance")["URL"]
    start_load_until_told(node, namespace, url)

    broken = run_script_pod(
        node, namespace, "broken", PODS / "register_broken.py",
        [json.dumps({"model": "insurance", "from_version": 1, "alias": "champion",
                     "how": "corrupt"})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert broken["phase"] == "Succeeded", broken["logs"]
    assert json.loads(broken["logs"].strip().splitlines()[-1]) == {"version": 2}

    def status() -> dict[str, Any]:
        found: dict[str, Any] = json.loads(
            node.kubectl("get", "md", "insurance", "-n", namespace, "-o", "json").stdout
        )["status"]
        return found

    failed = wait_for(
        node, "version 2 recorded as failed",
        lambda: (s := status()).get("failedVersion") == 2 and s,
        timeout=600,
    )  # fmt: skip
    seen = stop_load(node, namespace)
    assert failed["servedVersion"] == 1, failed
    assert "traffic stays on version 1" in failed.get("message", ""), failed
    assert get_columns(node, "md", namespace, "insurance")["VERSION"] == "1"
    assert seen["errors"] == 0, seen
    assert seen["requests"] > 100, seen
    assert len(seen["answers"]) == 1, seen  # version 1's prediction, throughout
