"""What a team runs on a real cluster (docs/object-storage.md, docs/mlflow-server.md,
docs/pods.md), on the real node: the chart's MLflow with two replicas on a real PostgreSQL
and its artifacts on a real S3-compatible store (versitygw), both on the host at the bridge
address; a TrainingRun whose Ray pods read the dataset from s3:// and write the model to S3
with keys from a Secret through envFrom, as an allowed ServiceAccount, placed by
nodeSelector/tolerations/affinity; a ModelDeployment whose predictor loads it from there;
the operator, the Ray pods and the predictor all on the same MLflow. One chart release of
its own (uninstalled at the end), since the lane's shared one keeps SQLite."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from tests.cluster.node import Node
from tests.cluster.objectstore import ObjectStore
from tests.cluster.postgres import Postgres
from tests.node.steps import (
    CHART,
    LANE_VALUES,
    MLFLOW,
    RELEASE_NS,
    RUNTIME,
    example,
    get_columns,
    helm,
    insurance_rows,
    release_installed,
    run_script_pod,
    s3_env_from,
    secret,
    small_trainingrun,
    trainingrun_ended,
    uninstall_chart,
    wait_for,
)

PODS = Path(__file__).resolve().parent / "pods"
MLFLOW_HOST = f"mlkube-mlflow.{RELEASE_NS}.svc.cluster.local:5000"
# Where the pods run (the node's own labels) and a taint they would tolerate.
PLACEMENT = {
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "mlkube.io/ml", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "preference": {"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}}]}},
}  # fmt: skip


def apply(node: Node, namespace: str, manifest: dict[str, Any], check: bool = True) -> Any:
    return node.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=check
    )


def install_team_chart(node: Node, store: ObjectStore, db: Postgres) -> None:
    """The chart as docs/mlflow-server.md sets it up: the database URI and the store's keys
    in Secrets made beforehand, two MLflow replicas, artifacts on S3 that clients reach with
    keys of their own."""
    if release_installed(node):  # the lane's shared release (SQLite)
        uninstall_chart(node)
    node.kubectl("create", "namespace", RELEASE_NS)
    secret(node, RELEASE_NS, "mlflow-db", {"uri": db.uri})
    secret(node, RELEASE_NS, "mlflow-s3", {"AWS_ACCESS_KEY_ID": store.access_key,
                                           "AWS_SECRET_ACCESS_KEY": store.secret_key})  # fmt: skip
    helm(node, "install", "mlkube", str(CHART), "-n", RELEASE_NS,
         "--set", "mlflow.enabled=true", *LANE_VALUES,
         "--set", "mlflow.replicas=2",
         "--set", "mlflow.backendStore.existingSecret=mlflow-db",
         "--set", "mlflow.artifacts.destination=s3://mlflow/artifacts",
         "--set", "mlflow.artifacts.proxied=false",
         "--set", "mlflow.envFromSecrets={mlflow-s3}",
         "--set", f"mlflow.env[0].name=AWS_ENDPOINT_URL,mlflow.env[0].value={store.endpoint}",
         "--set", "mlflow.resources.requests.cpu=50m",
         "--set", "operator.allowedServiceAccounts={ml-runner}",
         "--wait", "--timeout", "6m")  # fmt: skip


def alias_from_each_replica(node: Node, model: str) -> list[str]:
    """The champion's version as each MLflow pod answers it (the host reaches pod IPs)."""
    pods = json.loads(node.kubectl(
        "get", "pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/component=mlflow",
        "--field-selector=status.phase=Running", "-o", "json").stdout)["items"]  # fmt: skip
    versions = []
    for pod in pods:
        connection = http.client.HTTPConnection(pod["status"]["podIP"], 5000, timeout=30)
        connection.request(
            "GET", f"/api/2.0/mlflow/registered-models/alias?name={model}&alias=champion",
            headers={"Host": MLFLOW_HOST},
        )  # fmt: skip
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        versions.append(json.load(answer)["model_version"]["version"])
    return versions


def test_a_team_setup_s3_postgres_two_mlflow_replicas_and_pod_options(
    node: Node,
    namespace: str,
    object_store: ObjectStore,
    postgres: Postgres,
    model_name: str,
    shared_dir: Path,
) -> None:
    data_csv = shared_dir / "data" / "insurance.csv"
    dataset = object_store.put("datasets", f"{namespace}/insurance.csv", data_csv)
    object_store.bucket("mlflow")
    try:
        install_team_chart(node, object_store, postgres)
        replicas = node.kubectl("get", "deploy", "mlkube-mlflow", "-n", RELEASE_NS, "-o",
                                "jsonpath={.status.readyReplicas}").stdout  # fmt: skip
        assert replicas == "2"

        # The tenant's namespace: the store's keys in a Secret, its address in a ConfigMap, and
        # a ServiceAccount the admin allows.
        env_from = s3_env_from(node, namespace, object_store)
        node.kubectl("create", "serviceaccount", "ml-runner", "-n", namespace)
        options = {
            "envFrom": env_from,
            "env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}],
            "serviceAccountName": "ml-runner",
            **PLACEMENT,
        }  # fmt: skip

        # What the API server refuses outright, naming the field; and what the operator refuses.
        refused = apply(node, namespace, small_trainingrun(dataset, **{
            "metadata.name": "redirected", "spec.model.name": model_name,
            "spec.ray.env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://elsewhere:5000"}]}),
            check=False)  # fmt: skip
        assert refused.returncode != 0
        assert "spec.ray.env[0].name" in refused.stderr and "set by the operator" in refused.stderr
        apply(node, namespace, small_trainingrun(dataset, **{
            "metadata.name": "as-admin", "spec.model.name": model_name,
            "spec.ray.serviceAccountName": "default-admin"}))  # fmt: skip

        run = small_trainingrun(
            dataset,
            **{"spec.model.name": model_name, **{f"spec.ray.{k}": v for k, v in options.items()}},
        )
        apply(node, namespace, run)
        as_admin = trainingrun_ended(node, namespace, "as-admin", timeout=120)
        assert as_admin["PHASE"] == "Failed"
        reason = node.kubectl(
            "get",
            "tr",
            "as-admin",
            "-n",
            namespace,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Succeeded")].reason}',
        ).stdout
        assert reason == "ServiceAccountNotAllowed"

        # The Ray head runs as the allowed account, placed as asked, with no token mounted.
        head = wait_for(node, "the Ray head pod", lambda: json.loads(node.kubectl(
            "get", "pods", "-n", namespace, "-l", "ray.io/node-type=head", "-o", "json"
        ).stdout)["items"], timeout=300)[0]["spec"]  # fmt: skip
        assert head["serviceAccountName"] == "ml-runner"
        assert head["nodeSelector"] == PLACEMENT["nodeSelector"]
        assert PLACEMENT["tolerations"][0] in head["tolerations"]
        assert head["automountServiceAccountToken"] is False
        assert not [m for c in head["containers"] for m in c.get("volumeMounts", [])
                    if "serviceaccount" in m["mountPath"]]  # fmt: skip

        tr = trainingrun_ended(node, namespace, "insurance")
        assert tr["PHASE"] == "Succeeded", node.kubectl("get", "tr", "-n", namespace, "-o", "yaml")
        assert (tr["TRIALS"], tr["VERSION"], tr["PROMOTED"]) == ("4", "1", "true"), tr
        assert node.kubectl("get", "rayjobs", "-n", namespace, "-o", "name").stdout.split() == [
            "rayjob.ray.io/insurance"
        ]  # nothing for the refused ones
        # The model went to S3 from the Ray pod, the registry to PostgreSQL.
        assert any(k.endswith("/MLmodel") for k in object_store.keys("mlflow", "artifacts/"))
        assert postgres.query(
            f"select count(*) from model_versions where name = '{model_name}'"
        ) == "1"  # fmt: skip
        assert alias_from_each_replica(node, model_name) == ["1", "1"]

        # Served: the operator resolved the alias through the same MLflow; the predictor loads
        # the artifacts from S3 with the namespace's keys.
        deployment = example(
            "modeldeployment.yaml",
            **{
                "spec.model": {"name": model_name},
                "spec.replicas": {"min": 1, "max": 1},
                "spec.resources": {"cpu": "500m", "memory": "1Gi"},
                **{f"spec.{k}": v for k, v in options.items()},
            },
        )
        apply(node, namespace, deployment)
        md = wait_for(
            node, "ModelDeployment Ready",
            lambda: (c := get_columns(node, "md", namespace, "insurance"))["READY"] == "True" and c,
            timeout=300,
        )  # fmt: skip
        assert md["VERSION"] == "1"
        predictor = json.loads(node.kubectl(
            "get", "pods", "-n", namespace, "-l", "serving.kserve.io/inferenceservice=insurance",
            "-o", "json").stdout)["items"][0]["spec"]  # fmt: skip
        assert predictor["serviceAccountName"] == "ml-runner"
        assert predictor["nodeSelector"] == PLACEMENT["nodeSelector"]
        rows = insurance_rows(data_csv, 3)
        result = run_script_pod(
            node, namespace, "client", PODS / "predict_client.py",
            [json.dumps({"url": md["URL"], "model": model_name, "rows": rows,
                         "model_uris": [f"models:/{model_name}/1"]})],
            image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW, **object_store.env()},
        )  # fmt: skip
        assert result["phase"] == "Succeeded", result["logs"]
        seen = json.loads(result["logs"].strip().splitlines()[-1])
        assert seen["v1"] == seen["direct"][f"models:/{model_name}/1"], seen

        node.kubectl("delete", "md,tr", "--all", "-n", namespace, "--timeout=120s", timeout=130)
    finally:
        # The next test that needs the lane's release installs it again, with SQLite.
        uninstall_chart(node)
