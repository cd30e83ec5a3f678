"""Manifests of the shape mlkube builds are accepted by the real KubeRay/KServe CRD schemas,
and a misspelt field is refused by the server, with the field named."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.controlplane import ControlPlane
from tests.cluster.crds import apply_manifest, names_unknown_field

RAYJOB: dict[str, Any] = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "shape"},
    "spec": {
        "entrypoint": "python -m mlkube.flows.train --help",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 60,
        "activeDeadlineSeconds": 3600,
        "runtimeEnvYAML": "env_vars:\n  MLFLOW_TRACKING_URI: http://mlflow:5000\n",
        "rayClusterSpec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "ray-head",
                                "image": "rayproject/ray:2.60.0",
                                "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
                            }
                        ]
                    }
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": 2,
                    "minReplicas": 0,
                    "maxReplicas": 4,
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": "rayproject/ray:2.60.0",
                                    "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
                                }
                            ]
                        }
                    },
                }
            ],
        },
    },
}

ISVC: dict[str, Any] = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "shape"},
    "spec": {
        "predictor": {
            "minReplicas": 0,
            "maxReplicas": 2,
            "canaryTrafficPercent": 10,
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "mlkube/predictor:latest",
                    "command": ["python", "-m", "mlkube.model_servers"],
                    "args": ["--model-uri", "models:/insurance/3", "--ttl-seconds", "600"],
                    "env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}],
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                }
            ],
        },
    },
}


@pytest.mark.parametrize("manifest", [RAYJOB, ISVC], ids=["rayjob", "inferenceservice"])
def test_intended_shape_is_accepted(
    control_plane: ControlPlane,
    foreign_crds: list[str],
    namespace: str,
    manifest: dict[str, Any],
) -> None:
    apply_manifest(control_plane, namespace, manifest)
    plural = {"RayJob": "rayjob", "InferenceService": "inferenceservice"}[manifest["kind"]]
    stored = yaml.safe_load(
        control_plane.kubectl(
            "get", plural, manifest["metadata"]["name"], "-n", namespace, "-o", "yaml"
        ).stdout
    )
    # Nothing was pruned: what we sent is what the server kept.
    assert _contains(stored["spec"], manifest["spec"])


def _contains(have: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _contains(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(_contains(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(have == want)


MISSPELT = [
    pytest.param(
        RAYJOB, ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish", id="rayjob-spec"
    ),
    pytest.param(
        RAYJOB,
        ("spec", "rayClusterSpec", "workerGroupSpecs", 0),
        "replicas",
        "replica",
        id="rayjob-workergroup",
    ),
    pytest.param(
        ISVC,
        ("spec", "predictor"),
        "canaryTrafficPercent",
        "canaryTraficPercent",
        id="isvc-predictor",
    ),
    pytest.param(
        ISVC, ("spec", "predictor", "containers", 0), "image", "imagee", id="isvc-container"
    ),
]


def _misspell(manifest: dict[str, Any], path: tuple[Any, ...], good: str, bad: str) -> str:
    """Rename one field in place; returns its dotted path as the server names it."""
    node: Any = manifest
    dotted: list[str] = []
    for key in path:
        node = node[key]
        dotted.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    node[bad] = node.pop(good)
    return ("".join(dotted) + f".{bad}").lstrip(".")


@pytest.mark.parametrize("server_side", [False, True], ids=["apply", "apply-server-side"])
@pytest.mark.parametrize(("base", "path", "good", "bad"), MISSPELT)
def test_misspelt_field_is_rejected_by_kubectl(
    control_plane: ControlPlane,
    foreign_crds: list[str],
    namespace: str,
    base: dict[str, Any],
    path: tuple[Any, ...],
    good: str,
    bad: str,
    server_side: bool,
) -> None:
    manifest = copy.deepcopy(base)
    field = _misspell(manifest, path, good, bad)
    result = apply_manifest(
        control_plane, namespace, manifest, check=False, server_side=server_side
    )
    assert result.returncode != 0
    assert names_unknown_field(result.stderr, field), result.stderr


@pytest.mark.parametrize(("base", "path", "good", "bad"), MISSPELT)
def test_misspelt_field_is_rejected_by_the_api(
    kube_api: client.ApiClient,
    foreign_crds: list[str],
    namespace: str,
    base: dict[str, Any],
    path: tuple[Any, ...],
    good: str,
    bad: str,
) -> None:
    manifest = copy.deepcopy(base)
    field = _misspell(manifest, path, good, bad)
    group, version = manifest["apiVersion"].split("/")
    plural = {"RayJob": "rayjobs", "InferenceService": "inferenceservices"}[manifest["kind"]]
    with pytest.raises(ApiException) as err:
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            group, version, namespace, plural, manifest, field_validation="Strict"
        )
    assert err.value.status == 400
    message = json.loads(err.value.body or "{}")["message"]
    assert names_unknown_field(message, field), message


def test_wrong_type_is_rejected_with_the_field_named(
    control_plane: ControlPlane, foreign_crds: list[str], namespace: str
) -> None:
    manifest = copy.deepcopy(RAYJOB)
    manifest["spec"]["shutdownAfterJobFinishes"] = "yes"
    result = apply_manifest(control_plane, namespace, manifest, check=False)
    assert result.returncode != 0
    assert "spec.shutdownAfterJobFinishes" in result.stderr, result.stderr


def _built() -> list[dict[str, Any]]:
    """What the operator builds, with every optional part on: workers, the submitter's pod,
    restricted pods without a token, MLflow credentials from a Secret, pod labels, the
    spec's pod options, the predictor's cache on a claim; a RayJob on an existing cluster
    and a warm cluster (Prefect's API beside its head)."""
    import datetime as dt

    from mlkube.api import ModelDeployment, TrainingRun
    from mlkube.operator.inferenceservice import build_inferenceservice
    from mlkube.operator.rayclusters import build_warm_raycluster
    from mlkube.operator.rayjob import build_rayjob
    from tests.unit.test_pod_options import OPTIONS

    run = TrainingRun.model_validate({
        "metadata": {"name": "built", "uid": "u"},
        "spec": {"task": "insurance", "model": {"name": "m"},
                 "ray": {"workers": 2, **OPTIONS}},
    })  # fmt: skip
    deployment = ModelDeployment.model_validate({
        "metadata": {"name": "built", "uid": "u"},
        "spec": {"model": {"name": "m"}, "canary": {"trafficPercent": 10},
                 "cache": {"persistentVolumeClaim": "models"}, **OPTIONS},
    })  # fmt: skip
    warm = build_warm_raycluster(run, "mlflow-creds", dt.datetime.now(dt.UTC))
    warm["metadata"]["name"] = "built"
    return [
        build_rayjob(run, "http://mlflow:5000", credentials_secret="mlflow-creds",
                     allow_shared_models=True),
        build_inferenceservice(deployment, 3, tracking_uri="http://mlflow:5000", image="i:1",
                               canary_traffic_percent=10, credentials_secret="mlflow-creds"),
        build_rayjob(run, "http://mlflow:5000", cluster_name="warm"),
        warm,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "index", [0, 1, 2, 3], ids=["rayjob", "inferenceservice", "rayjob-on-a-cluster", "raycluster"]
)
def test_what_the_operator_builds_is_accepted_whole(
    control_plane: ControlPlane, foreign_crds: list[str], namespace: str, index: int
) -> None:
    """Strict validation, and nothing pruned: the securityContext, the token switch, the
    submitter's template, the Secret references and the pod options all reach KubeRay and
    KServe."""
    manifest = _built()[index]
    manifest["metadata"].pop("namespace", None)
    apply_manifest(control_plane, namespace, manifest)
    plural = {"RayJob": "rayjob", "InferenceService": "inferenceservice",
              "RayCluster": "raycluster"}[manifest["kind"]]  # fmt: skip
    stored = yaml.safe_load(
        control_plane.kubectl("get", plural, "built", "-n", namespace, "-o", "yaml").stdout
    )
    assert _contains(stored["spec"], manifest["spec"])
