"""A better model takes over on the real node: a second TrainingRun beats the champion, the
operator pod is deleted while it runs, and the ModelDeployment rolls to the new version
while a client keeps sending requests, none of which may fail."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    RELEASE_NS,
    RUNTIME,
    example,
    get_columns,
    run_script_pod,
    serve_dataset,
    wait_for,
)

PODS = Path(__file__).resolve().parent / "pods"
ROW = {"age": 40, "sex": "female", "bmi": 27.5, "children": 1, "smoker": "no",
       "region": "northwest"}  # fmt: skip


def train(node: Node, namespace: str, name: str, uri: str, **changes: object) -> dict[str, str]:
    run = example(
        "trainingrun.yaml",
        **{"metadata.name": name, "spec.dataset.uri": uri, "spec.tuning.numTrials": 4,
           "spec.ray.workers": 0, "spec.ray.head": {"cpu": "800m", "memory": "3Gi"},
           "spec.ttlSecondsAfterFinished": 0, **changes},
    )  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(run))
    return {"name": name}


def finished(node: Node, namespace: str, name: str, timeout: float = 900) -> dict[str, str]:
    columns = wait_for(
        node, f"TrainingRun {name} finished",
        lambda: (c := get_columns(node, "tr", namespace, name))["PHASE"]
        in ("Succeeded", "Failed") and c,
        timeout=timeout,
    )  # fmt: skip
    assert columns["PHASE"] == "Succeeded", node.kubectl(
        "get", "tr", name, "-n", namespace, "-o", "yaml"
    ).stdout
    return dict(columns)


def test_a_better_model_rolls_out_without_a_failed_request(
    node: Node, namespace: str, release: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    # A weak first champion: one boosting round.
    train(node, namespace, "weak", uri, **{
        "spec.tuning.numTrials": 1,
        "spec.tuning.searchSpace": {"max_iter": {"choice": [1]},
                                    "learning_rate": {"choice": [0.01]}},
    })  # fmt: skip
    weak = finished(node, namespace, "weak")
    assert (weak["VERSION"], weak["PROMOTED"]) == ("1", "true")

    deployment = example(
        "modeldeployment.yaml",
        **{"spec.replicas": {"min": 1, "max": 1},
           "spec.resources": {"cpu": "300m", "memory": "1Gi"}},
    )  # fmt: skip
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))
    wait_for(
        node, "ModelDeployment Ready",
        lambda: get_columns(node, "md", namespace, "insurance")["READY"] == "True",
        timeout=300,
    )  # fmt: skip
    url = get_columns(node, "md", namespace, "insurance")["URL"]

    # The client runs in a pod of its own while the better model is trained and rolled out.
    client = {"url": url, "model": "insurance", "row": ROW, "max_seconds": 900,
              "after_change_seconds": 15}  # fmt: skip
    node.kubectl("create", "configmap", "load-script", "-n", namespace,
                 f"--from-file=load_client.py={PODS / 'load_client.py'}")  # fmt: skip
    node.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "load", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False,
            "containers": [{
                "name": "main", "image": RUNTIME, "imagePullPolicy": "Never",
                "command": ["python", "/script/load_client.py", json.dumps(client)],
                "volumeMounts": [{"name": "script", "mountPath": "/script"}],
            }],
            "volumes": [{"name": "script", "configMap": {"name": "load-script"}}],
        },
    }))  # fmt: skip

    train(node, namespace, "better", uri)
    # The operator pod goes while the better run trains: its replacement takes over.
    wait_for(
        node, "TrainingRun better Running",
        lambda: get_columns(node, "tr", namespace, "better")["PHASE"] == "Running",
        timeout=300,
    )  # fmt: skip
    node.kubectl("delete", "pod", "-n", RELEASE_NS, "-l", "app.kubernetes.io/component=operator",
                 "--wait=false")  # fmt: skip
    better = finished(node, namespace, "better")
    assert (better["VERSION"], better["PROMOTED"]) == ("2", "true"), better
    rayjobs = node.kubectl("get", "rayjobs", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(rayjobs) == ["rayjob.ray.io/better", "rayjob.ray.io/weak"]

    md = wait_for(
        node, "ModelDeployment serving version 2",
        lambda: (c := get_columns(node, "md", namespace, "insurance"))["VERSION"] == "2"
        and c["READY"] == "True" and c,
        timeout=300,
    )  # fmt: skip
    assert md["URL"] == url
    deadline = time.monotonic() + 120
    phase = ""
    while time.monotonic() < deadline and phase not in ("Succeeded", "Failed"):
        phase = node.kubectl("get", "pod", "load", "-n", namespace, "-o",
                             "jsonpath={.status.phase}").stdout  # fmt: skip
        time.sleep(1)
    logs = node.kubectl("logs", "load", "-n", namespace).stdout
    seen = json.loads(logs.strip().splitlines()[-1])

    versions = {}
    for version in (1, 2):
        direct = run_script_pod(
            node, namespace, f"direct-{version}", PODS / "predict_client.py",
            [json.dumps({"url": url, "model": "insurance", "rows": [ROW],
                         "model_uri": f"models:/insurance/{version}"})],
            image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
        )  # fmt: skip
        versions[version] = json.loads(direct["logs"].strip().splitlines()[-1])["direct"][0]
    assert seen["errors"] == 0, seen
    assert seen["requests"] > 100, seen
    # Traffic moved from version 1 to version 2 (both may answer while both pods are up).
    answers = seen["answers"]
    assert answers[0] == versions[1] and answers[-1] == versions[2], (seen, versions)
    assert set(answers) == {versions[1], versions[2]}, (seen, versions)
