"""The user's path of docs/install.md on the real node, with the real KubeRay and KServe:
`helm install`, a TrainingRun trained in Ray pods and logged to the chart's MLflow, a
ModelDeployment served by KServe, predictions through the Service's cluster DNS name, and
`helm uninstall`. Nothing here is played: every object is acted on by its real controller."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    RELEASE_NS,
    RUNTIME,
    example,
    get_columns,
    helm,
    install_chart,
    insurance_rows,
    namespaced_leftovers,
    release_installed,
    run_script_pod,
    serve_dataset,
    small_trainingrun,
    total,
    trainingrun_ended,
    uninstall_chart,
    wait_for,
)

PODS = Path(__file__).resolve().parent / "pods"


def test_install_train_serve_predict_uninstall(
    node: Node, namespace: str, shared_dir: Path
) -> None:
    if release_installed(node):  # the lane's shared release, from an earlier test
        uninstall_chart(node)
    install_chart(node)

    data_csv = shared_dir / "data" / "insurance.csv"
    dataset_uri = serve_dataset(node, namespace, data_csv)

    # Train. The node has two cores: no worker pods, and the Ray head goes once it is done.
    run = small_trainingrun(dataset_uri)
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
    tr = trainingrun_ended(node, namespace, "insurance")
    assert tr["PHASE"] == "Succeeded", node.kubectl("get", "tr", "-n", namespace, "-o", "yaml")
    assert (tr["TRIALS"], tr["VERSION"], tr["PROMOTED"]) == ("4", "1", "true"), tr
    rayjobs = node.kubectl("get", "rayjobs", "-n", namespace, "-o", "name").stdout.split()
    assert rayjobs == ["rayjob.ray.io/insurance"]
    rayjob = json.loads(node.kubectl("get", "rayjob", "insurance", "-n", namespace, "-o",
                                     "json").stdout)  # fmt: skip
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True  # a cluster of the run's own

    # Serve what `champion` points at.
    deployment = example(
        "modeldeployment.yaml",
        **{"spec.replicas": {"min": 1, "max": 1}, "spec.ttlSeconds": 5,
           "spec.resources": {"cpu": "500m", "memory": "1Gi"}},
    )  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    md = wait_for(
        node, "ModelDeployment Ready",
        lambda: (c := get_columns(node, "md", namespace, "insurance"))["READY"] == "True" and c,
        timeout=300,
    )  # fmt: skip
    assert md["VERSION"] == "1"
    url = md["URL"]
    assert url == f"http://insurance-predictor.{namespace}.svc.cluster.local", md

    rows = insurance_rows(data_csv, 5)
    result = run_script_pod(
        node, namespace, "client", PODS / "predict_client.py",
        [json.dumps({"url": url, "model": "insurance", "rows": rows,
                     # gRPC through the same Service, on its h2c port
                     "grpc": f"{url.removeprefix('http://')}:8081",
                     "model_uris": ["models:/insurance/1"], "idle_seconds": 12})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert result["phase"] == "Succeeded", result["logs"]
    seen = json.loads(result["logs"].strip().splitlines()[-1])
    direct = seen["direct"]["models:/insurance/1"]
    assert seen["v1"] == direct, seen
    assert seen["v2"] == direct
    assert seen["grpc"] == direct
    assert seen["after_idle"] == direct
    loads = ("mlkube_model_loads_total", 'outcome="success"')
    evictions = ("mlkube_model_cache_evictions_total", 'reason="ttl"')
    assert total(seen["metrics_before_idle"], *loads) == 1  # the first request loaded it
    assert total(seen["metrics_after_idle"], *evictions) == 1, seen["metrics_after_idle"]
    assert total(seen["metrics_after_reload"], *loads) == 2

    # The user removes what they made, then the release: nothing of mlkube's is left.
    node.kubectl("delete", "md,tr", "--all", "-n", namespace, "--timeout=120s", timeout=130)
    helm(node, "uninstall", "mlkube", "-n", RELEASE_NS, "--wait")
    assert not release_installed(node)
    node.kubectl("wait", "--for=delete", "pods", "--all", "-n", RELEASE_NS, "--timeout=120s",
                 timeout=130)  # fmt: skip
    for kind in ("rayjobs", "rayclusters", "inferenceservices"):
        assert node.kubectl("get", kind, "-n", namespace, "-o", "name").stdout == ""
    assert namespaced_leftovers(node, RELEASE_NS) == []
    cluster_scoped = node.kubectl(
        "get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/instance=mlkube",
        "-o", "name",
    ).stdout  # fmt: skip
    assert cluster_scoped == ""
