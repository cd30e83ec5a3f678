"""A better model takes over on the real node: a second TrainingRun beats the champion, the
operator pod is deleted while it runs, and the ModelDeployment rolls to the new version
while a client keeps sending requests, none of which may fail."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    RELEASE_NS,
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


def finished(node: Node, namespace: str, name: str) -> dict[str, str]:
    columns = trainingrun_ended(node, namespace, name)
    assert columns["PHASE"] == "Succeeded", node.kubectl(
        "get", "tr", name, "-n", namespace, "-o", "yaml"
    ).stdout
    return columns


def apply(node: Node, namespace: str, manifest: dict[str, object]) -> None:
    node.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def test_a_better_model_rolls_out_without_a_failed_request(
    node: Node, namespace: str, release: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    # A weak first champion: one boosting round.
    apply(node, namespace, small_trainingrun(uri, **{
        "metadata.name": "weak", "spec.tuning.numTrials": 1,
        "spec.tuning.searchSpace": {"max_iter": {"choice": [1]},
                                    "learning_rate": {"choice": [0.01]}},
    }))  # fmt: skip
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
    start_load(node, namespace, client)

    apply(node, namespace, small_trainingrun(uri, **{"metadata.name": "better"}))
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
    seen = load_result(node, namespace)

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
