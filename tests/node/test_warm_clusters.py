"""TrainingRuns on a warm RayCluster, on the real node with the real KubeRay: the first run
that asks for one makes it, the next runs on the same head pod (no new cluster), a run may
name it, a name that does not exist fails the run before anything is made, and the cluster
goes once unused for operator.warmClusterIdleSeconds (30 s in the lane)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cluster.node import Node
from tests.node.steps import serve_dataset, small_trainingrun, trainingrun_ended, wait_for


def warm_clusters(node: Node, namespace: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(node.kubectl(
        "get", "rayclusters", "-n", namespace, "-l", "mlkube.io/warm-cluster=true", "-o", "json",
    ).stdout)["items"]  # fmt: skip
    return found


def head_pods(node: Node, namespace: str) -> list[str]:
    pods = json.loads(node.kubectl(
        "get", "pods", "-n", namespace, "-l", "ray.io/node-type=head", "-o", "json").stdout
    )["items"]  # fmt: skip
    return [p["metadata"]["uid"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def run_to_end(node: Node, namespace: str, name: str, manifest: dict[str, Any]) -> dict[str, str]:
    manifest["metadata"]["name"] = name
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    ended = trainingrun_ended(node, namespace, name)
    assert ended["PHASE"] == "Succeeded", node.kubectl(
        "get", "tr", name, "-n", namespace, "-o", "yaml"
    ).stdout
    return ended


def test_trainingruns_share_a_warm_cluster_that_goes_when_idle(
    node: Node, namespace: str, release: str, model_name: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    warm = small_trainingrun(uri, **{"spec.model.name": model_name,
                                     "spec.ray.cluster": {"warm": True}})  # fmt: skip

    first = run_to_end(node, namespace, "first", warm)
    assert (first["VERSION"], first["PROMOTED"]) == ("1", "true"), first
    (cluster,) = warm_clusters(node, namespace)
    name = cluster["metadata"]["name"]
    assert not cluster["metadata"].get("ownerReferences")  # outlives the run
    heads = head_pods(node, namespace)
    assert len(heads) == 1

    second = run_to_end(node, namespace, "second", warm)
    assert second["VERSION"] == "2", second
    by_name = small_trainingrun(uri, **{"spec.model.name": model_name,
                                        "spec.ray.cluster": {"name": name}})  # fmt: skip
    run_to_end(node, namespace, "by-name", by_name)
    # All three ran on the one cluster: its head pod is the one the first run started.
    assert [c["metadata"]["name"] for c in warm_clusters(node, namespace)] == [name]
    assert head_pods(node, namespace) == heads
    # The runs after the first found the train flow pre-imported on the head (its zygote
    # forked them); the first may have come before the zygote's imports were done.
    zygote_log = node.kubectl("logs", "-n", namespace, "-l", "ray.io/node-type=head",
                              "-c", "ray-head", "--tail", "-1").stdout  # fmt: skip
    assert "mlkube.flows.train imported; serving" in zygote_log, zygote_log[-3000:]
    assert zygote_log.count("mlkube.flows.zygote: run ") >= 2, zygote_log[-3000:]
    for run in ("first", "second", "by-name"):
        job = json.loads(node.kubectl("get", "rayjob", run, "-n", namespace, "-o",
                                      "json").stdout)  # fmt: skip
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
        assert job["status"]["rayClusterName"] == name

    # A cluster that is not there: Failed at once, naming the field; no RayJob.
    missing = small_trainingrun(uri, **{"metadata.name": "missing",
                                        "spec.model.name": model_name,
                                        "spec.ray.cluster": {"name": "nope"}})  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(missing))
    ended = trainingrun_ended(node, namespace, "missing", timeout=120)
    status = json.loads(node.kubectl("get", "tr", "missing", "-n", namespace, "-o",
                                     "json").stdout)["status"]  # fmt: skip
    assert ended["PHASE"] == "Failed"
    assert status["message"].startswith("spec.ray.cluster.name: no RayCluster 'nope'"), status
    assert node.kubectl("get", "rayjob", "missing", "-n", namespace, check=False).returncode

    # Unused for 30 s: the operator deletes it, and KubeRay its pods.
    wait_for(node, "the idle warm cluster deleted",
             lambda: not warm_clusters(node, namespace) and not head_pods(node, namespace),
             timeout=180)  # fmt: skip
