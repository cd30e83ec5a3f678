"""The predictor's disk cache on a volume, on the real node: the container's process killed
(a crash: the pod stays, the kubelet restarts the container) comes back and loads the model
from the pod's emptyDir without downloading it again, as its /metrics says. Also what
spec.protocol shows a user: where to call the model (status, `kubectl get md -o wide`), and
the call there answering in that protocol over REST and gRPC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    RUNTIME,
    example,
    get_columns,
    insurance_rows,
    register_outside_model,
    run_script_pod,
    serve_dataset,
    total,
    wait_for,
)

PODS = Path(__file__).resolve().parent / "pods"


def predictor_pod(node: Node, namespace: str) -> dict[str, Any]:
    pods = json.loads(node.kubectl(
        "get", "pods", "-n", namespace, "-l", "serving.kserve.io/inferenceservice=insurance",
        "-o", "json").stdout)["items"]  # fmt: skip
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    found: dict[str, Any] = pods[0]
    return found


def ask(node: Node, namespace: str, name: str, md: dict[str, Any], model: str,
        rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """A client pod: predictions over v1, v2 and gRPC (at status.grpcAddress), the version
    loaded directly from MLflow, and the predictor's metrics after."""
    base = md["status"]["predictUrl"].split("/v2/", 1)[0]
    result = run_script_pod(
        node, namespace, name, PODS / "predict_client.py",
        [json.dumps({"url": base, "model": model, "rows": rows,
                     "grpc": md["status"]["grpcAddress"],
                     "model_uris": [f"models:/{model}/1"], "idle_seconds": 1})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert result["phase"] == "Succeeded", result["logs"]
    seen: dict[str, Any] = json.loads(result["logs"].strip().splitlines()[-1])
    return seen


def test_a_restarted_predictor_container_loads_from_its_cache_volume(
    node: Node, namespace: str, release: str, model_name: str, shared_dir: Path
) -> None:
    data_csv = shared_dir / "data" / "insurance.csv"
    uri = serve_dataset(node, namespace, data_csv)
    assert register_outside_model(node, namespace, model_name, uri) == 1

    deployment = example("modeldeployment.yaml", **{
        "spec.model": {"name": model_name, "version": 1}, "spec.protocol": "v2",
        "spec.replicas": {"min": 1, "max": 1}, "spec.ttlSeconds": 600,
        "spec.resources": {"cpu": "300m", "memory": "1Gi"},
        "spec.cache": {"sizeLimit": "1Gi"}})  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    wait_for(node, "ModelDeployment Ready",
             lambda: get_columns(node, "md", namespace, "insurance")["READY"] == "True",
             timeout=300)  # fmt: skip
    md = json.loads(node.kubectl("get", "md", "insurance", "-n", namespace, "-o", "json").stdout)
    host = f"insurance-predictor.{namespace}.svc.cluster.local"
    assert md["status"]["predictUrl"] == f"http://{host}/v2/models/{model_name}/infer"
    assert md["status"]["grpcAddress"] == f"{host}:8081"
    wide = node.kubectl("get", "md", "insurance", "-n", namespace, "-o", "wide").stdout
    assert "PREDICT" in wide and md["status"]["predictUrl"] in wide

    pod = predictor_pod(node, namespace)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "1Gi"}
    rows = insurance_rows(data_csv, 3)
    first = ask(node, namespace, "client", md, model_name, rows)
    direct = first["direct"][f"models:/{model_name}/1"]
    assert first["v2"] == direct and first["grpc"] == direct and first["v1"] == direct
    downloads = ("mlkube_artifact_downloads_total", f'model="{model_name}"')
    assert total(first["metrics_after_reload"], *downloads) == 1, first["metrics_after_reload"]

    # A crash: the container's process killed from the host; the pod stays.
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    node.ctr("tasks", "kill", "-s", "SIGKILL", container_id)
    wait_for(
        node, "the predictor container restarted and Ready",
        lambda: (p := predictor_pod(node, namespace))["metadata"]["uid"] == pod["metadata"]["uid"]
        and p["status"]["containerStatuses"][0]["restartCount"] >= 1
        and p["status"]["containerStatuses"][0]["ready"],
        timeout=180,
    )  # fmt: skip
    again = ask(node, namespace, "client2", md, model_name, rows)
    assert again["v2"] == direct
    # The new process found the files on the pod's volume: no download, a disk-cache hit.
    assert total(again["metrics_after_reload"], *downloads) == 0, again["metrics_after_reload"]
    hits = ("mlkube_artifact_cache_hits_total", f'model="{model_name}"')
    assert total(again["metrics_after_reload"], *hits) >= 1, again["metrics_after_reload"]
