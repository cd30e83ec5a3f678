"""New versions under traffic on the real node. A second TrainingRun beats the champion
while the operator pod is deleted, and the ModelDeployment rolls to it; then a version whose
artifacts are broken becomes champion and never takes traffic. A client keeps sending
requests throughout, and none may fail. Both runs train on one warm Ray cluster, as a team
retraining often would (a new cluster per run is the user's path, tests/node/test_user_path.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cluster.node import Node
from tests.node.steps import (
    MLFLOW,
    RELEASE_NS,
    ROW,
    RUNTIME,
    example,
    get_columns,
    run_script_pod,
    serve_dataset,
    small_trainingrun,
    start_load_until_told,
    stop_load,
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


def get_json(node: Node, namespace: str, *what: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        node.kubectl("get", *what, "-n", namespace, "-o", "json").stdout
    )
    return found


def event_reasons(node: Node, namespace: str, uid: str) -> list[str]:
    events = get_json(node, namespace, "events", f"--field-selector=involvedObject.uid={uid}")
    return [event["reason"] for event in events["items"]]


def test_new_versions_roll_out_under_traffic_and_a_broken_one_never_takes_it(
    node: Node, namespace: str, release: str, model_name: str, shared_dir: Path
) -> None:
    uri = serve_dataset(node, namespace, shared_dir / "data" / "insurance.csv")
    warm = {"spec.ray.cluster": {"warm": True}}
    # A weak first champion: one boosting round.
    apply(node, namespace, small_trainingrun(uri, **warm, **{
        "metadata.name": "weak", "spec.model.name": model_name, "spec.tuning.numTrials": 1,
        "spec.tuning.searchSpace": {"max_iter": {"choice": [1]},
                                    "learning_rate": {"choice": [0.01]}},
    }))  # fmt: skip
    weak = finished(node, namespace, "weak")
    assert (weak["VERSION"], weak["PROMOTED"]) == ("1", "true")

    deployment = example(
        "modeldeployment.yaml",
        **{"spec.model.name": model_name, "spec.replicas": {"min": 1, "max": 1},
           "spec.resources": {"cpu": "300m", "memory": "1Gi"}},
    )  # fmt: skip
    apply(node, namespace, deployment)
    wait_for(
        node, "ModelDeployment Ready",
        lambda: get_columns(node, "md", namespace, "insurance")["READY"] == "True",
        timeout=300,
    )  # fmt: skip
    url = get_columns(node, "md", namespace, "insurance")["URL"]

    # The client runs in a pod of its own from here to the end.
    start_load_until_told(node, namespace, url, model_name)

    # Two trials of the example's search space beat one boosting round.
    apply(node, namespace, small_trainingrun(uri, **warm, **{
        "metadata.name": "better", "spec.model.name": model_name, "spec.tuning.numTrials": 2,
    }))  # fmt: skip
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

    # One RayJob per TrainingRun, owned by it; the new operator did not create another.
    rayjobs = node.kubectl("get", "rayjobs", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(rayjobs) == ["rayjob.ray.io/better", "rayjob.ray.io/weak"]
    tr = get_json(node, namespace, "tr", "better")
    rayjob = get_json(node, namespace, "rayjob", "better")
    (owner,) = rayjob["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "TrainingRun", tr["metadata"]["uid"], True,
    )  # fmt: skip
    status = tr["status"]
    assert status["rayJobName"] == "better" and status["mlflowRunId"], status
    assert status["trials"] == {"completed": 2, "total": 2}, status
    assert status["best"]["metric"] == "mae" and status["best"]["params"], status
    assert status["promotionReason"], status
    reasons = wait_for(
        node, "Promoted event",
        lambda: "Promoted" in (r := event_reasons(node, namespace, tr["metadata"]["uid"])) and r,
        timeout=60,
    )  # fmt: skip
    assert "RayJobCreated" in reasons and "RayJobAdopted" not in reasons, reasons

    wait_for(
        node, "ModelDeployment serving version 2",
        lambda: (c := get_columns(node, "md", namespace, "insurance"))["VERSION"] == "2"
        and c["READY"] == "True",
        timeout=300,
    )  # fmt: skip
    assert get_columns(node, "md", namespace, "insurance")["URL"] == url

    # A damaged upload becomes champion: its files download but do not load.
    broken = run_script_pod(
        node, namespace, "broken", PODS / "register_broken.py",
        [json.dumps({"model": model_name, "from_version": 2, "alias": "champion",
                     "how": "corrupt"})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert broken["phase"] == "Succeeded", broken["logs"]
    assert json.loads(broken["logs"].strip().splitlines()[-1]) == {"version": 3}
    failed = wait_for(
        node, "version 3 recorded as failed",
        lambda: (s := get_json(node, namespace, "md", "insurance")["status"])
        .get("failedVersion") == 3 and s,
        timeout=600,
    )  # fmt: skip
    assert failed["servedVersion"] == 2, failed
    # Its predictor exited saying why, and the operator read that off the pod: the rollout
    # failed then, not at operator.rolloutTimeoutSeconds.
    message = failed.get("message", "")
    assert "(ModelLoadFailed)" in message and "does not load" in message, failed
    assert "traffic stays on version 2" in message, failed
    assert get_columns(node, "md", namespace, "insurance")["VERSION"] == "2"
    seen = stop_load(node, namespace)

    direct = run_script_pod(
        node, namespace, "direct", PODS / "predict_client.py",
        [json.dumps({"url": url, "model": model_name, "rows": [ROW], "served": False,
                     "model_uris": [f"models:/{model_name}/{v}" for v in (1, 2)]})],
        image=RUNTIME, env={"MLFLOW_TRACKING_URI": MLFLOW},
    )  # fmt: skip
    assert direct["phase"] == "Succeeded", direct["logs"]
    by_uri = json.loads(direct["logs"].strip().splitlines()[-1])["direct"]
    v1, v2 = (by_uri[f"models:/{model_name}/{v}"][0] for v in (1, 2))
    assert seen["errors"] == 0, seen
    assert seen["requests"] > 100, seen
    # Traffic moved from version 1 to version 2 (both may answer while both pods are up),
    # and never to the broken version 3.
    answers = seen["answers"]
    assert answers[0] == v1 and answers[-1] == v2 and set(answers) == {v1, v2}, (seen, v1, v2)

    # Deleting a TrainingRun removes its RayJob (owner reference + garbage collector).
    node.kubectl("delete", "tr", "better", "-n", namespace, "--timeout=60s", timeout=70)
    wait_for(
        node, "RayJob better garbage-collected",
        lambda: node.kubectl("get", "rayjob", "better", "-n", namespace, check=False)
        .returncode != 0,
        timeout=120,
    )  # fmt: skip
