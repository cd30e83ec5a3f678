"""The RayJob and InferenceService players write the status KubeRay and KServe would."""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.request
from typing import Any, cast

import pytest
from kubernetes import client

from tests.cluster.players import (
    InferenceServicePlayer,
    RayJobPlayer,
    condition,
    wait_for_object,
    wait_gone,
)

RAY = ("ray.io", "v1", "rayjobs")
KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")


def _rayjob(name: str, entrypoint: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {
                "headGroupSpec": {
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "containers": [{"name": "ray-head", "image": "rayproject/ray:2.60.0"}]
                        }
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": 1,
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [
                                    {"name": "ray-worker", "image": "rayproject/ray:2.60.0"}
                                ]
                            }
                        },
                    }
                ],
            },
            **spec,
        },
    }


def _create(api: client.ApiClient, kind: tuple[str, str, str], ns: str, body: Any) -> None:
    group, version, plural = kind
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        group, version, ns, plural, body, field_validation="Strict"
    )


def _terminal(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("jobDeploymentStatus") in ("Complete", "Failed")


def _wait_rayjob(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    return wait_for_object(api, *RAY, ns, name, _terminal, timeout=120, what="Complete or Failed")


def test_rayjob_that_exits_0_completes(
    kube_api: client.ApiClient, namespace: str, rayjob_player: RayJobPlayer
) -> None:
    _create(kube_api, RAY, namespace, _rayjob("ok", 'python -c "print(1)"'))
    status = _wait_rayjob(kube_api, namespace, "ok")["status"]
    assert status["jobDeploymentStatus"] == "Complete"
    assert status["jobStatus"] == "SUCCEEDED"
    assert status["succeeded"] == 1
    assert status["jobId"].startswith("ok-")
    assert status["rayClusterName"].startswith("ok-")
    assert status["startTime"] and status["endTime"]
    assert rayjob_player.logs("ok")[0].strip() == "1"


def test_rayjob_that_exits_3_fails_with_stderr_in_the_message(
    kube_api: client.ApiClient, namespace: str, rayjob_player: RayJobPlayer
) -> None:
    entrypoint = "python -c \"import sys; print('boom', file=sys.stderr); sys.exit(3)\""
    _create(kube_api, RAY, namespace, _rayjob("bad", entrypoint))
    status = _wait_rayjob(kube_api, namespace, "bad")["status"]
    assert status["jobDeploymentStatus"] == "Failed"
    assert status["jobStatus"] == "FAILED"
    assert status["reason"] == "AppFailed"
    assert "exit code 3" in status["message"] and "boom" in status["message"]
    assert status["failed"] == 1


def test_rayjob_gets_env_vars_from_its_runtime_env(
    kube_api: client.ApiClient, namespace: str, rayjob_player: RayJobPlayer
) -> None:
    entrypoint = "python -c \"import os, sys; sys.exit(os.environ['GREETING'] != 'hi')\""
    body = _rayjob("env", entrypoint, runtimeEnvYAML="env_vars:\n  GREETING: hi\n")
    _create(kube_api, RAY, namespace, body)
    assert _wait_rayjob(kube_api, namespace, "env")["status"]["jobStatus"] == "SUCCEEDED"


def test_rayjob_owns_a_raycluster_removed_after_the_job(
    kube_api: client.ApiClient, namespace: str, rayjob_player: RayJobPlayer
) -> None:
    _create(kube_api, RAY, namespace, _rayjob("cl", "sleep 1"))
    running = wait_for_object(
        kube_api,
        *RAY,
        namespace,
        "cl",
        lambda o: (o.get("status") or {}).get("jobStatus") == "RUNNING",
        what="RUNNING",
    )
    cluster = running["status"]["rayClusterName"]
    assert running["status"]["dashboardURL"].startswith(f"{cluster}-head-svc.")
    rc = cast(
        dict[str, Any],
        client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayclusters", cluster
        ),
    )
    assert rc["metadata"]["ownerReferences"][0]["name"] == "cl"
    _wait_rayjob(kube_api, namespace, "cl")
    # shutdownAfterJobFinishes: true, ttlSecondsAfterFinished 0 -> the cluster goes.
    assert wait_gone(
        client.CustomObjectsApi(kube_api).get_namespaced_custom_object,
        "ray.io",
        "v1",
        namespace,
        "rayclusters",
        cluster,
        timeout=60,
    ), f"RayCluster {cluster} still there after the job finished"


def test_deleting_a_running_rayjob_kills_its_process_and_gc_removes_its_cluster(
    kube_api: client.ApiClient, namespace: str, rayjob_player: RayJobPlayer
) -> None:
    _create(kube_api, RAY, namespace, _rayjob("long", "sleep 300"))
    running = wait_for_object(
        kube_api,
        *RAY,
        namespace,
        "long",
        lambda o: (o.get("status") or {}).get("jobStatus") == "RUNNING",
        what="RUNNING",
    )
    proc = rayjob_player.process("long")
    assert proc is not None and proc.poll() is None
    client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        *RAY[:2], namespace, RAY[2], "long"
    )
    proc.wait(timeout=30)  # raises if the player never killed it
    # The RayCluster it owned goes through the garbage collector: a custom resource owning
    # a custom resource (the GC learns new CRDs within its 30 s discovery resync).
    cluster = running["status"]["rayClusterName"]
    assert wait_gone(
        client.CustomObjectsApi(kube_api).get_namespaced_custom_object,
        "ray.io",
        "v1",
        namespace,
        "rayclusters",
        cluster,
        timeout=120,
    ), f"RayCluster {cluster} not garbage-collected after its RayJob went"


# --------------------------------------------------------------------------- InferenceService


def _isvc(
    name: str, *args: str, canary: int | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    predictor: dict[str, Any] = {
        "containers": [
            {
                "name": "kserve-container",
                "image": "mlkube/predictor:test",
                "command": ["python", "-m", "tests.cluster.fake_predictor"],
                "args": ["--model_name", name, *args],
                "env": [{"name": "FAKE_PREDICTOR", "value": "1"}],
            }
        ],
    }
    if canary is not None:
        predictor["canaryTrafficPercent"] = canary
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"predictor": predictor},
    }


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _ready_at(generation: int) -> Any:
    def check(obj: dict[str, Any]) -> bool:
        status = obj.get("status") or {}
        return status.get("observedGeneration") == generation and condition(obj, "Ready") in (
            "True",
            "False",
        )

    return check


def test_inferenceservice_gets_ready_with_a_url_that_answers(
    kube_api: client.ApiClient, namespace: str, isvc_player: InferenceServicePlayer
) -> None:
    _create(kube_api, KSERVE, namespace, _isvc("iris", "--tag", "v1"))
    obj = wait_for_object(kube_api, *KSERVE, namespace, "iris", _ready_at(1), what="Ready")
    status = obj["status"]
    assert condition(obj, "Ready") == "True"
    assert condition(obj, "PredictorReady") == "True"
    assert condition(obj, "IngressReady") == "True"
    assert status["url"].startswith("http://127.0.0.1:")
    assert status["address"]["url"] == status["url"]
    assert status["modelStatus"]["states"]["activeModelState"] == "Loaded"
    predictor = status["components"]["predictor"]
    assert predictor["latestReadyRevision"] == "iris-predictor-00001"
    assert predictor["traffic"][0]["percent"] == 100
    assert _get_json(status["url"] + "/v1/models") == {"models": ["iris"]}
    assert _get_json(status["url"] + "/tag") == {"tag": "v1"}


def test_inferenceservice_canary_splits_traffic_then_rolls_out(
    kube_api: client.ApiClient, namespace: str, isvc_player: InferenceServicePlayer
) -> None:
    api = client.CustomObjectsApi(kube_api)
    _create(kube_api, KSERVE, namespace, _isvc("c", "--tag", "v1"))
    wait_for_object(kube_api, *KSERVE, namespace, "c", _ready_at(1), what="Ready")

    # A new template with a canary: the new revision gets 20%, the old one keeps 80%.
    api.patch_namespaced_custom_object(
        *KSERVE[:2], namespace, KSERVE[2], "c", _isvc("c", "--tag", "v2", canary=20)
    )
    obj = wait_for_object(kube_api, *KSERVE, namespace, "c", _ready_at(2), what="Ready")
    predictor = obj["status"]["components"]["predictor"]
    traffic = {t["tag"]: t for t in predictor["traffic"]}
    assert traffic["latest"]["revisionName"] == "c-predictor-00002"
    assert traffic["latest"]["percent"] == 20
    assert traffic["prev"]["revisionName"] == "c-predictor-00001"
    assert traffic["prev"]["percent"] == 80
    assert predictor["latestRolledoutRevision"] == "c-predictor-00001"
    assert _get_json(traffic["latest"]["url"] + "/tag") == {"tag": "v2"}
    assert _get_json(traffic["prev"]["url"] + "/tag") == {"tag": "v1"}

    # Promote: no canary any more -> the latest revision takes 100% and is rolled out.
    body = _isvc("c", "--tag", "v2")
    body["spec"]["predictor"]["canaryTrafficPercent"] = None
    api.patch_namespaced_custom_object(*KSERVE[:2], namespace, KSERVE[2], "c", body)
    obj = wait_for_object(kube_api, *KSERVE, namespace, "c", _ready_at(3), what="Ready")
    predictor = obj["status"]["components"]["predictor"]
    assert [(t["revisionName"], t["percent"]) for t in predictor["traffic"]] == [
        ("c-predictor-00002", 100)
    ]
    assert predictor["latestRolledoutRevision"] == "c-predictor-00002"
    assert predictor["previousRolledoutRevision"] == "c-predictor-00001"
    assert _get_json(obj["status"]["url"] + "/tag") == {"tag": "v2"}
    assert list(isvc_player.logs("c")) == ["c-predictor-00002"]  # the old process is gone


def test_inferenceservice_whose_predictor_crashes_is_not_ready(
    kube_api: client.ApiClient, namespace: str, isvc_player: InferenceServicePlayer
) -> None:
    _create(kube_api, KSERVE, namespace, _isvc("crash", "--exit-code", "3"))
    obj = wait_for_object(kube_api, *KSERVE, namespace, "crash", _ready_at(1), what="Ready")
    assert condition(obj, "Ready") == "False"
    assert condition(obj, "PredictorReady") == "False"
    model = obj["status"]["modelStatus"]
    assert model["transitionStatus"] == "BlockedByFailedLoad"
    assert model["lastFailureInfo"]["exitCode"] == 3
    assert "failing on purpose" in model["lastFailureInfo"]["message"]


def test_inferenceservice_in_standard_mode_has_no_revisions(
    kube_api: client.ApiClient, namespace: str, isvc_player: InferenceServicePlayer
) -> None:
    body = _isvc(
        "raw", "--tag", "v1", annotations={"serving.kserve.io/deploymentMode": "RawDeployment"}
    )
    _create(kube_api, KSERVE, namespace, body)
    obj = wait_for_object(kube_api, *KSERVE, namespace, "raw", _ready_at(1), what="Ready")
    assert condition(obj, "Ready") == "True"
    assert obj["status"]["deploymentMode"] == "Standard"
    assert "traffic" not in obj["status"]["components"]["predictor"]
    assert _get_json(obj["status"]["url"] + "/tag") == {"tag": "v1"}


def test_deleting_an_inferenceservice_stops_its_predictor(
    kube_api: client.ApiClient, namespace: str, isvc_player: InferenceServicePlayer
) -> None:
    _create(kube_api, KSERVE, namespace, _isvc("gone", "--tag", "v1"))
    obj = wait_for_object(kube_api, *KSERVE, namespace, "gone", _ready_at(1), what="Ready")
    url = obj["status"]["url"]
    client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        *KSERVE[:2], namespace, KSERVE[2], "gone"
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _get_json(url + "/tag")
        except (OSError, http.client.HTTPException):  # refused, or cut off while dying
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} still answers after the InferenceService was deleted")


@pytest.mark.skipif(sys.platform != "linux", reason="process groups as on Linux")
def test_players_stop_their_processes_on_exit(
    kube_api: client.ApiClient, namespace: str, foreign_crds: list[str]
) -> None:
    with RayJobPlayer(kube_api, namespace) as player:
        _create(kube_api, RAY, namespace, _rayjob("orphan", "sleep 300"))
        wait_for_object(
            kube_api,
            *RAY,
            namespace,
            "orphan",
            lambda o: (o.get("status") or {}).get("jobStatus") == "RUNNING",
            what="RUNNING",
        )
        proc = player.process("orphan")
        assert proc is not None
    assert proc.poll() is not None
