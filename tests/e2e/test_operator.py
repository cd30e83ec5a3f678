"""The operator end to end: real control plane, KubeRay and KServe played by the test
players, a real MLflow server, the operator under kopf's KopfRunner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mlkube.local import free_port
from tests.cluster.players import (
    InferenceServicePlayer,
    condition,
    wait_for_object,
    wait_gone,
)
from tests.e2e.operator_support import running_operator

MLKUBE = ("mlkube.io", "v1alpha1")
TRAININGRUNS = (*MLKUBE, "trainingruns")
MODELDEPLOYMENTS = (*MLKUBE, "modeldeployments")
RAYJOBS = ("ray.io", "v1", "rayjobs")
ISVCS = ("serving.kserve.io", "v1beta1", "inferenceservices")
REPO = Path(__file__).resolve().parents[2]
# The player runs entrypoints with the repo root as cwd; the data lives beside the repo.
INSURANCE_CSV = "../shared/data/insurance.csv"

Obj = dict[str, Any]


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def create(api: client.ApiClient, kind: tuple[str, str, str], ns: str, body: Obj) -> Obj:
    group, version, plural = kind
    created = custom(api).create_namespaced_custom_object(group, version, ns, plural, body)
    return cast(Obj, created)


def listing(api: client.ApiClient, kind: tuple[str, str, str], ns: str) -> list[Obj]:
    group, version, plural = kind
    found = cast(Obj, custom(api).list_namespaced_custom_object(group, version, ns, plural))
    return cast(list[Obj], found["items"])


def wait(
    api: client.ApiClient, kind: tuple[str, str, str], ns: str, name: str,
    predicate: Callable[[Obj], bool], what: str, timeout: float = 120,
) -> Obj:  # fmt: skip
    return wait_for_object(api, *kind, ns, name, predicate, timeout=timeout, what=what)


def phase_is(*phases: str) -> Callable[[Obj], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") in phases


def event_reasons(api: client.ApiClient, ns: str, uid: str) -> list[str]:
    events = client.CoreV1Api(api).list_namespaced_event(
        ns, field_selector=f"involvedObject.uid={uid}"
    )
    return [str(e.reason) for e in events.items]


def wait_for_events(api: client.ApiClient, ns: str, uid: str, *reasons: str) -> list[str]:
    """kopf posts events in the background: poll until all `reasons` are there."""
    import time

    deadline = time.monotonic() + 30
    while True:
        seen = event_reasons(api, ns, uid)
        if set(reasons) <= set(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.3)


def gone(api: client.ApiClient, kind: tuple[str, str, str], ns: str, name: str) -> None:
    """Wait until the object is deleted (by the garbage collector)."""
    group, version, plural = kind
    assert wait_gone(
        custom(api).get_namespaced_custom_object, group, version, ns, plural, name, timeout=60
    ), f"{plural}/{name} was not garbage-collected"


def trainingrun(name: str, tracking_uri: str, dataset: str = INSURANCE_CSV) -> Obj:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "task": "insurance",
            "dataset": {"uri": dataset},
            "model": {"name": f"{name}-model"},
            "tuning": {"numTrials": 2, "maxConcurrentTrials": 2},
            "ray": {"workers": 0},
            "mlflow": {"trackingUri": tracking_uri},
            "ttlSecondsAfterFinished": 0,
        },
    }


# --------------------------------------------------------------------------- TrainingRun


def test_trainingrun_spec_is_immutable_and_invalid_specs_name_the_field(
    kube_api: client.ApiClient, namespace: str, crds: list[str]
) -> None:
    create(kube_api, TRAININGRUNS, namespace, trainingrun("fixed", "http://127.0.0.1:1"))
    with pytest.raises(ApiException) as changed:
        custom(kube_api).patch_namespaced_custom_object(
            *MLKUBE, namespace, "trainingruns", "fixed", {"spec": {"tuning": {"numTrials": 9}}}
        )
    assert changed.value.status == 422
    assert "spec is immutable once created" in str(changed.value.body)

    invalid = trainingrun("invalid", "http://127.0.0.1:1")
    invalid["spec"]["tuning"]["numTrials"] = 0
    with pytest.raises(ApiException) as refused:
        create(kube_api, TRAININGRUNS, namespace, invalid)
    assert refused.value.status == 422
    assert "spec.tuning.numTrials" in str(refused.value.body)


def test_the_operator_command_watches_the_namespaces_it_is_given(
    kube_api: client.ApiClient, namespace: str, operator_env: None, tmp_path: Path
) -> None:
    """`python -m mlkube.operator run -n NS`, the chart's command: a TrainingRun in NS gets
    its RayJob, one elsewhere is left alone, and SIGTERM stops the operator cleanly."""
    core = client.CoreV1Api(kube_api)
    elsewhere = f"elsewhere-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=elsewhere)))
    env = {**os.environ, "MLKUBE_OPERATOR_HEALTH_PORT": "0", "MLKUBE_OPERATOR_METRICS_PORT": "0"}
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        operator = subprocess.Popen(
            [sys.executable, "-m", "mlkube.operator", "run", "-n", namespace,
             "--log-format", "plain"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
    try:
        # The one elsewhere first: were it watched, it would get its RayJob no later.
        create(kube_api, TRAININGRUNS, elsewhere, trainingrun("ignored", "http://127.0.0.1:9"))
        create(kube_api, TRAININGRUNS, namespace, trainingrun("watched", "http://127.0.0.1:9"))
        wait(kube_api, RAYJOBS, namespace, "watched", lambda job: True, "RayJob watched")
        assert listing(kube_api, RAYJOBS, elsewhere) == []
        [ignored] = listing(kube_api, TRAININGRUNS, elsewhere)
        assert not ignored.get("status")
    finally:
        operator.terminate()
        code = operator.wait(timeout=90)
        core.delete_namespace(elsewhere)
    output = log.read_text(errors="replace")
    assert code == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]


# --------------------------------------------------------------------------- ModelDeployment


def register_versions(tracking_uri: str, name: str, slopes: list[float], owner: str) -> None:
    """One tiny scikit-learn model version per slope: y = slope * x, of a registered model
    the namespace `owner` owns (as if a TrainingRun there had registered it first)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.linear_model import LinearRegression

    from mlkube.training.ownership import TAG_OWNER

    MlflowClient(tracking_uri).create_registered_model(name, tags={TAG_OWNER: owner})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"{name}-models")
    x = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0]})
    for slope in slopes:
        model = LinearRegression().fit(x, x["x"] * slope)
        with mlflow.start_run():
            mlflow.sklearn.log_model(
                model, name="model", input_example=x.head(2),
                pip_requirements=["scikit-learn", "skops"], registered_model_name=name,
            )  # fmt: skip


def set_alias(tracking_uri: str, name: str, alias: str, version: int) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, str(version))


def predict(url: str, model: str, x: float) -> float:
    request = urllib.request.Request(
        f"{url}/v1/models/{model}:predict",
        data=json.dumps({"instances": [{"x": x}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return float(json.loads(response.read())["predictions"][0])


def modeldeployment(name: str, model: str, tracking_uri: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "annotations": spec.pop("annotations", {})},
        "spec": {
            "model": {"name": model},
            "ttlSeconds": 60,
            "replicas": {"min": 0, "max": 1},
            "mlflow": {"trackingUri": tracking_uri},
            **spec,
        },
    }


def served(version: int) -> Callable[[Obj], bool]:
    def check(obj: Obj) -> bool:
        status = obj.get("status") or {}
        return (
            status.get("phase") == "Ready"
            and status.get("servedVersion") == version
            and not status.get("canary")
            and bool(status.get("url"))
        )

    return check


def test_modeldeployment_follows_champion_with_a_canary(
    kube_api: client.ApiClient,
    namespace: str,
    isvc_player: InferenceServicePlayer,
    mlflow_server: Any,
    operator_env: None,
) -> None:
    uri, model = mlflow_server.tracking_uri, f"lin-{namespace}"
    register_versions(uri, model, [2.0, 3.0], owner=namespace)
    set_alias(uri, model, "champion", 1)
    body = modeldeployment("lin", model, uri, canary={"trafficPercent": 30})
    with running_operator(namespace):
        md = create(kube_api, MODELDEPLOYMENTS, namespace, body)
        first = wait(kube_api, MODELDEPLOYMENTS, namespace, "lin", served(1), "serving v1", 180)
        assert predict(first["status"]["url"], model, 2.0) == pytest.approx(4.0)
        (isvc,) = listing(kube_api, ISVCS, namespace)
        (owner,) = isvc["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("ModelDeployment", md["metadata"]["uid"])
        (container,) = isvc["spec"]["predictor"]["containers"]
        assert container["name"] == "kserve-container"
        assert f"models:/{model}/1" in container["args"]
        assert isvc["spec"]["predictor"]["minReplicas"] == 0

        set_alias(uri, model, "champion", 2)
        second = wait(kube_api, MODELDEPLOYMENTS, namespace, "lin", served(2), "serving v2", 180)
        status = second["status"]
        assert status["previousVersion"] == 1
        assert predict(status["url"], model, 2.0) == pytest.approx(6.0)
        (isvc,) = listing(kube_api, ISVCS, namespace)
        assert f"models:/{model}/2" in isvc["spec"]["predictor"]["containers"][0]["args"]
        assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]  # promoted
        reasons = wait_for_events(
            kube_api, namespace, md["metadata"]["uid"], "RolloutStarted", "CanaryPromoted"
        )
        assert {"RolloutStarted", "CanaryPromoted", "RolledOut"} <= set(reasons), reasons
        starts = client.CoreV1Api(kube_api).list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.uid={md['metadata']['uid']},reason=RolloutStarted",
        )
        assert any("canary with 30%" in str(e.message) for e in starts.items)

        # Rollback: pin version 1.
        custom(kube_api).patch_namespaced_custom_object(
            *MLKUBE, namespace, "modeldeployments", "lin", {"spec": {"model": {"version": 1}}}
        )
        back = wait(kube_api, MODELDEPLOYMENTS, namespace, "lin", served(1), "back on v1", 180)
        assert predict(back["status"]["url"], model, 2.0) == pytest.approx(4.0)

        # Deleting the ModelDeployment removes its InferenceService.
        custom(kube_api).delete_namespaced_custom_object(
            *MLKUBE, namespace, "modeldeployments", "lin"
        )
        gone(kube_api, ISVCS, namespace, isvc["metadata"]["name"])


def models_served(versions: dict[str, int]) -> Callable[[Obj], bool]:
    """Ready, every listed model served at these versions and ready."""

    def check(obj: Obj) -> bool:
        status = obj.get("status") or {}
        models = {m["name"]: m for m in status.get("models") or []}
        return (
            status.get("phase") == "Ready"
            and set(models) == set(versions)
            and all(
                models[name].get("servedVersion") == version and models[name].get("ready")
                for name, version in versions.items()
            )
        )

    return check


def test_modeldeployment_of_several_models_follows_each_alias(
    kube_api: client.ApiClient,
    namespace: str,
    isvc_player: InferenceServicePlayer,
    mlflow_server: Any,
    operator_env: None,
) -> None:
    """spec.models: one InferenceService, a real predictor serving both models by name;
    one alias moves and only that model's version changes; a model of another namespace in
    the list fails the deployment, naming it."""
    uri = mlflow_server.tracking_uri
    double, fives, foreign = f"two-{namespace}", f"five-{namespace}", f"theirs-{namespace}"
    register_versions(uri, double, [2.0, 3.0], owner=namespace)
    register_versions(uri, fives, [5.0], owner=namespace)
    register_versions(uri, foreign, [7.0], owner="someone-else")
    for name in (double, fives, foreign):
        set_alias(uri, name, "champion", 1)
    body = modeldeployment("many", double, uri, memoryBudget="1Gi")
    body["spec"]["models"] = [{"name": double}, {"name": fives}]
    del body["spec"]["model"]
    with running_operator(namespace):
        create(kube_api, MODELDEPLOYMENTS, namespace, body)
        first = wait(
            kube_api, MODELDEPLOYMENTS, namespace, "many",
            models_served({double: 1, fives: 1}), "both models served", 180,
        )  # fmt: skip
        assert first["status"]["modelsReady"] == "2/2"
        url = first["status"]["url"]
        assert first["status"]["predictUrl"] == f"{url}/v1/models/{{model}}:predict"
        assert predict(url, double, 2.0) == pytest.approx(4.0)
        assert predict(url, fives, 2.0) == pytest.approx(10.0)
        (isvc,) = listing(kube_api, ISVCS, namespace)
        args = isvc["spec"]["predictor"]["containers"][0]["args"]
        assert f"{double}=models:/{double}/1" in args and f"{fives}=models:/{fives}/1" in args
        assert args[args.index("--owner-namespace") + 1] == namespace
        assert args[args.index("--memory-budget") + 1] == "1Gi"

        set_alias(uri, double, "champion", 2)
        moved = wait(
            kube_api, MODELDEPLOYMENTS, namespace, "many",
            models_served({double: 2, fives: 1}), "the moved alias served", 180,
        )  # fmt: skip
        assert predict(moved["status"]["url"], double, 2.0) == pytest.approx(6.0)
        assert predict(moved["status"]["url"], fives, 2.0) == pytest.approx(10.0)

        theirs = modeldeployment("theirs", double, uri)
        theirs["spec"]["models"] = [{"name": double}, {"name": foreign}]
        del theirs["spec"]["model"]
        create(kube_api, MODELDEPLOYMENTS, namespace, theirs)
        refused = wait(
            kube_api, MODELDEPLOYMENTS, namespace, "theirs", phase_is("Failed"), "refused"
        )
        assert refused["status"]["message"].startswith(
            f"spec.models[1].name: registered model {foreign!r} belongs to namespace 'someone-else'"
        )
        assert [i["metadata"]["name"] for i in listing(kube_api, ISVCS, namespace)] == ["many"]


def test_mlflow_unreachable_is_a_condition_not_a_crash(
    kube_api: client.ApiClient, namespace: str, operator_env: None
) -> None:
    body = modeldeployment("nomlflow", "m", f"http://127.0.0.1:{free_port()}")
    with running_operator(namespace) as runner:
        md = create(kube_api, MODELDEPLOYMENTS, namespace, body)
        down = wait(
            kube_api, MODELDEPLOYMENTS, namespace, "nomlflow",
            lambda o: condition(o, "MlflowReachable") == "False", "MlflowReachable=False",
        )  # fmt: skip
        reasons = wait_for_events(kube_api, namespace, md["metadata"]["uid"], "MlflowUnreachable")
    assert down["status"]["phase"] == "Pending"
    assert "MlflowUnreachable" in reasons
    assert not listing(kube_api, ISVCS, namespace)
    assert runner.exit_code == 0
    # The operator ran in this process: its Prometheus metrics are in the default registry.
    from prometheus_client import REGISTRY

    labels = {"resource": "modeldeployment", "handler": "change", "result": "ok"}
    assert (REGISTRY.get_sample_value("mlkube_operator_reconciles_total", labels) or 0) >= 1
    assert (REGISTRY.get_sample_value("mlkube_operator_mlflow_errors_total") or 0) >= 1


# --------------------------------------------------------------------------- finalizers

# What kopf put on objects when the operator had timers (older mlkube versions).
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def test_deletion_never_waits_for_the_operator(
    kube_api: client.ApiClient, namespace: str, mlflow_server: Any, operator_env: None
) -> None:
    """Finding 13: the operator leaves no finalizer, so with it gone (uninstalled, or scaled
    to 0) `kubectl delete` of a TrainingRun or ModelDeployment and the deletion of their
    namespace complete. An object an older operator left a finalizer on loses it."""
    uri, model = mlflow_server.tracking_uri, f"fin-{namespace}"
    register_versions(uri, model, [1.0], owner=namespace)
    set_alias(uri, model, "champion", 1)
    old = modeldeployment("old", model, uri)
    old["metadata"]["finalizers"] = [KOPF_FINALIZER]
    with running_operator(namespace):
        tr = create(kube_api, TRAININGRUNS, namespace, trainingrun("fin", uri))
        md = create(kube_api, MODELDEPLOYMENTS, namespace, modeldeployment("fin", model, uri))
        create(kube_api, MODELDEPLOYMENTS, namespace, old)
        # Reconciled: children made, status written (the TrainingRun is polled: no KubeRay
        # here, so its RayJob stays pending), and the old finalizer taken off.
        wait_for_object(kube_api, *RAYJOBS, namespace, "fin", lambda o: True, what="RayJob")
        wait_for_object(kube_api, *ISVCS, namespace, "fin", lambda o: True, what="ISVC")
        wait(kube_api, TRAININGRUNS, namespace, "fin", phase_is("Pending"), "a polled status")
        wait(kube_api, MODELDEPLOYMENTS, namespace, "fin", phase_is("Progressing"), "a status")
        wait(
            kube_api, MODELDEPLOYMENTS, namespace, "old",
            lambda o: KOPF_FINALIZER not in (o["metadata"].get("finalizers") or []),
            "the old finalizer removed",
        )  # fmt: skip
        for kind, obj in ((TRAININGRUNS, tr), (MODELDEPLOYMENTS, md)):
            group, version, plural = kind
            live = cast(Obj, custom(kube_api).get_namespaced_custom_object(
                group, version, namespace, plural, obj["metadata"]["name"]
            ))  # fmt: skip
            assert not live["metadata"].get("finalizers"), live["metadata"]
    # The operator is gone: deleting still completes.
    custom(kube_api).delete_namespaced_custom_object(*MLKUBE, namespace, "modeldeployments", "fin")
    gone(kube_api, MODELDEPLOYMENTS, namespace, "fin")
    core = client.CoreV1Api(kube_api)
    core.delete_namespace(namespace)  # with the TrainingRun, the RayJob, "old" and its ISVC
    assert wait_gone(core.read_namespace, namespace, timeout=180), "namespace deletion hung"
