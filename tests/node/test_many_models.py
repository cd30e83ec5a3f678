"""Several models from one InferenceService on the real node, with the real KServe: a
ModelDeployment listing two registered models of its namespace (spec.models) under a memory
budget smaller than either model, so that every switch evicts the least recently used one.
What a user sees: `kubectl get md` (MODELS 2/2), status.models, each model's predictions
and readiness at the one Service, and the evictions in the predictor's /metrics."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    RUNTIME,
    example,
    get_columns,
    insurance_rows,
    run_script_pod,
    serve_dataset,
    total,
    wait_for,
)

PODS = Path(__file__).resolve().parent / "pods"


def test_two_models_share_one_predictor_and_its_memory_budget(
    node: Node, namespace: str, release: str, model_name: str, shared_dir: Path
) -> None:
    data_csv = shared_dir / "data" / "insurance.csv"
    uri = serve_dataset(node, namespace, data_csv)
    first, second = f"{model_name}-a", f"{model_name}-b"
    registered = run_script_pod(
        node, namespace, "register", PODS / "register_model.py",
        [json.dumps({"models": [first, second], "owner": namespace, "data": uri})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert registered["phase"] == "Succeeded", registered["logs"]
    versions = json.loads(registered["logs"].strip().splitlines()[-1])["versions"]
    assert versions == {first: 1, second: 1}

    deployment = example("modeldeployment.yaml", **{
        "metadata.name": "many",
        "spec.models": [{"name": first, "version": 1}, {"name": second, "version": 1}],
        "spec.memoryBudget": "1Ki",  # below one model: each load evicts the other
        "spec.replicas": {"min": 1, "max": 1}, "spec.ttlSeconds": 600,
        "spec.resources": {"cpu": "300m", "memory": "1Gi"}})  # fmt: skip
    del deployment["spec"]["model"]
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    wait_for(node, "both models Ready",
             lambda: get_columns(node, "md", namespace, "many")["MODELS"] == "2/2",
             timeout=300)  # fmt: skip
    md = json.loads(node.kubectl("get", "md", "many", "-n", namespace, "-o", "json").stdout)
    assert md["status"]["phase"] == "Ready"
    assert [(m["name"], m["servedVersion"], m["ready"]) for m in md["status"]["models"]] == [
        (first, 1, True), (second, 1, True)
    ]  # fmt: skip
    isvcs = node.kubectl("get", "isvc", "-n", namespace, "-o", "name").stdout.split()
    assert isvcs == ["inferenceservice.serving.kserve.io/many"]

    base = md["status"]["predictUrl"].split("/v1/", 1)[0]
    rows = insurance_rows(data_csv, 3)
    asked = run_script_pod(
        node, namespace, "client", PODS / "predict_client.py",
        [json.dumps({"url": base, "order": [first, second, first], "rows": rows})],
        image=RUNTIME,
    )  # fmt: skip
    assert asked["phase"] == "Succeeded", asked["logs"]
    seen = json.loads(asked["logs"].strip().splitlines()[-1])
    a, b, a_again = seen["predictions"]
    assert len(a) == len(b) == 3 and a_again == a
    assert seen["ready"] == {first: 200, second: 200}
    found = seen["metrics"]

    def metric(name: str, model: str, extra: str = "") -> float:
        return total(found, name, f'model="{model}"{extra}')

    # first loaded, evicted for second, loaded again (evicting second): all by memory
    assert metric("mlkube_model_loads_total", first, ',outcome="success"') == 2, found
    for model in (first, second):
        evicted = metric("mlkube_model_cache_evictions_total", model, ',reason="memory"')
        assert evicted == 1, found
    assert (
        metric("mlkube_model_cache_bytes", first) > 0
        and metric("mlkube_model_cache_bytes", second) == 0
    ), found
    assert metric("mlkube_artifact_downloads_total", first) <= 1, found
