"""The predictor's disk cache on a volume of the pod (an emptyDir with the spec's size limit,
or the spec's own claim), and what spec.protocol changes for a user: where status says to
call the model."""

from __future__ import annotations

from typing import Any

import pytest

from mlkube.api import ManifestError, ModelDeployment, parse_resource
from mlkube.api.modeldeployment import ModelDeploymentStatus
from mlkube.operator.inferenceservice import (
    CACHE_DIR,
    CACHE_MOUNT,
    build_inferenceservice,
    client_endpoints,
)
from mlkube.operator.rollout import plan_rollout
from tests.unit.test_operator_rollout import NOW, view


def deployment(**spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "metadata": {"name": "ins", "namespace": "ml"},
        "spec": {"model": {"name": "insurance", "version": 1}, **spec},
    })  # fmt: skip


def predictor(**spec: Any) -> dict[str, Any]:
    isvc = build_inferenceservice(deployment(**spec), 1, tracking_uri="u", image="i")
    found: dict[str, Any] = isvc["spec"]["predictor"]
    return found


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_cache_is_an_emptydir_with_the_specs_size_limit_by_default() -> None:
    default = predictor()
    assert default["volumes"] == [{"name": "model-cache", "emptyDir": {"sizeLimit": "4Gi"}}]
    (container,) = default["containers"]
    assert container["volumeMounts"] == [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    # A folder in the volume: the predictor makes it private to its user (the volume's own
    # root is root's).
    assert flag(container["args"], "--cache-dir") == CACHE_DIR
    assert CACHE_DIR.startswith(CACHE_MOUNT + "/")
    # The cache stays within 3/4 of the limit: room for the download in progress.
    assert int(flag(container["args"], "--disk-cache-size")) == 3 * 2**30

    small = predictor(cache={"sizeLimit": "512Mi"})
    assert small["volumes"][0]["emptyDir"] == {"sizeLimit": "512Mi"}
    assert int(flag(small["containers"][0]["args"], "--disk-cache-size")) == 384 * 2**20


def test_a_claim_when_the_spec_names_one() -> None:
    claimed = predictor(cache={"persistentVolumeClaim": "model-cache", "sizeLimit": "20Gi"})
    assert claimed["volumes"] == [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}
    ]
    assert claimed["securityContext"]["fsGroup"] == 10001  # its root is usually root's
    assert "fsGroup" not in predictor()["securityContext"]
    # A claim's size is its own: the cache may fill the bound the spec gives.
    assert int(flag(claimed["containers"][0]["args"], "--disk-cache-size")) == 20 * 2**30


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"sizeLimit": "lots"}, "spec.cache.sizeLimit: String should match pattern"),
        ({"persistentVolumeClaim": "Not_A_Claim"}, "spec.cache.persistentVolumeClaim: String"),
    ],
)
def test_bad_cache_settings_name_the_field(cache: dict[str, Any], message: str) -> None:
    document = {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "x"},
        "spec": {"model": {"name": "m"}, "cache": cache},
    }
    with pytest.raises(ManifestError, match=message):  # fmt: skip
        parse_resource(document)


@pytest.mark.parametrize(
    ("protocol", "raw", "predict", "grpc"),
    [
        ("v1", True, "http://isvc.ns.svc/v1/models/insurance:predict", None),
        ("v2", True, "http://isvc.ns.svc/v2/models/insurance/infer", "isvc.ns.svc:8081"),
        # Knative allows one port per container: no gRPC address to give.
        ("v2", False, "http://isvc.ns.svc/v2/models/insurance/infer", None),
    ],
)
def test_status_says_where_to_call_the_model_in_its_protocol(
    protocol: str, raw: bool, predict: str, grpc: str | None
) -> None:
    assert client_endpoints("http://isvc.ns.svc", "insurance", protocol, raw) == (predict, grpc)
    assert client_endpoints(None, "insurance", protocol, raw) == (None, None)


def test_the_rollout_writes_the_endpoints_into_status() -> None:
    for protocol, predict, grpc in (
        ("v1", "http://isvc/v1/models/insurance:predict", None),
        ("v2", "http://isvc/v2/models/insurance/infer", "isvc:8081"),
    ):
        md = deployment(protocol=protocol)
        ready = plan_rollout(md, ModelDeploymentStatus(), desired_version=1,
                             isvc=view(1, "Ready", mode="Standard"), deployment_mode="Standard",
                             now=NOW)  # fmt: skip
        assert (ready.status.predict_url, ready.status.grpc_address) == (predict, grpc)
        assert ready.status.to_k8s()["predictUrl"] == predict
