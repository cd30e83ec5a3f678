"""Pod options (env, envFrom, nodeSelector, tolerations, affinity, imagePullSecrets,
serviceAccountName) on TrainingRuns and ModelDeployments: the fields the models accept and
refuse (naming the field), where the builders put them, and the admin's service-account
allow-list."""

from __future__ import annotations

from typing import Any

import pytest

from mlkube.api import ManifestError, ModelDeployment, TrainingRun, parse_resource
from mlkube.api.pods import reserved_env_name
from mlkube.local import TELEMETRY_OFF_ENV
from mlkube.operator.inferenceservice import build_inferenceservice, inferenceservice_patch
from mlkube.operator.pods import MLFLOW_CREDENTIAL_KEYS
from mlkube.operator.policy import (
    SERVICE_ACCOUNT_NOT_ALLOWED,
    deployment_refusal,
    service_account_allowed,
    trainingrun_refusal,
)
from mlkube.operator.rayjob import build_rayjob
from mlkube.operator.settings import OperatorSettings

OPTIONS: dict[str, Any] = {
    "env": [
        {"name": "AWS_ENDPOINT_URL", "value": "http://s3.store:7070"},
        {"name": "AWS_REGION", "valueFrom": {"configMapKeyRef": {"name": "s3", "key": "region"}}},
    ],
    "envFrom": [{"secretRef": {"name": "s3-credentials"}}, {"configMapRef": {"name": "team"}}],
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ml"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                   "labelSelector": {"matchLabels": {"a": "b"}}}}
            ]
        },
    },
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccountName": "ml-reader",
}  # fmt: skip
POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "imagePullSecrets")


def trainingrun(namespace: str = "ml", **ray: Any) -> TrainingRun:
    return TrainingRun.model_validate({
        "metadata": {"name": "ins", "namespace": namespace, "uid": "u-1"},
        "spec": {"task": "insurance", "model": {"name": "insurance"}, "ray": ray},
    })  # fmt: skip


def deployment(namespace: str = "ml", **spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "metadata": {"name": "ins", "namespace": namespace, "uid": "u-2"},
        "spec": {"model": {"name": "insurance", "version": 1}, **spec},
    })  # fmt: skip


def document(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = (
        {"task": "insurance", "model": {"name": "m"}, "ray": options}
        if kind == "TrainingRun"
        else {"model": {"name": "m"}, **options}
    )
    return {"apiVersion": "mlkube.io/v1alpha1", "kind": kind, "metadata": {"name": "x"},
            "spec": spec}  # fmt: skip


def test_the_variables_the_operator_sets_are_reserved() -> None:
    for name in [*TELEMETRY_OFF_ENV, *MLFLOW_CREDENTIAL_KEYS.values(), "MLFLOW_TRACKING_URI",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_REGISTRY_URI"]:  # fmt: skip
        assert reserved_env_name(name), name
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_S3_ENDPOINT_URL",
        "PYTHONHASHSEED",
    ):
        assert not reserved_env_name(name), name


@pytest.mark.parametrize("kind", ["TrainingRun", "ModelDeployment"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://evil:5000"}]},
         "env.0.name: MLFLOW_TRACKING_URI is set by the operator"),
        ({"env": [{"name": "DO_NOT_TRACK", "value": "0"}]}, "env.0.name: DO_NOT_TRACK is set"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]},
         "env.0: give value or valueFrom, one of them"),
        ({"env": [{"name": "1BAD", "value": "1"}]}, "env.0.name: String should match pattern"),
        ({"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]},
         "envFrom.0: give secretRef or configMapRef, one of them"),
        ({"envFrom": [{"secretRef": {"name": "Not_A_Name"}}]},
         "envFrom.0.secretRef.name: String should match pattern"),
        ({"tolerations": [{"key": "gpu", "effect": "Sometimes"}]},
         "tolerations.0.effect: Input should be"),
        ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                                        {"nodeSelectorTerms": []}}}},
         "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
         ".nodeSelectorTerms: List should have at least 1 item"),
        ({"imagePullSecrets": [{"name": "r", "optional": True}]},
         "imagePullSecrets.0.optional: unknown field"),
        ({"serviceAccountName": "Admin"}, "serviceAccountName: String should match pattern"),
        ({"nodeSelector": {"a": 1}}, "nodeSelector.a: Input should be a valid string"),
    ],
)  # fmt: skip
def test_bad_pod_options_are_refused_naming_the_field(
    kind: str, options: dict[str, Any], message: str
) -> None:
    where = "spec.ray." if kind == "TrainingRun" else "spec."
    with pytest.raises(ManifestError) as raised:
        parse_resource(document(kind, options))
    assert f"<input>: {where}{message}" in str(raised.value)


def test_pod_options_go_to_the_ray_head_workers_and_submitter() -> None:
    job = build_rayjob(trainingrun(workers=1, **OPTIONS), "http://mlflow:5000",
                       credentials_secret="mlflow-creds")  # fmt: skip
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    for pod in (head, worker):
        for field in (*POD_FIELDS, "serviceAccountName"):
            assert pod[field] == OPTIONS[field], field
        assert pod["automountServiceAccountToken"] is False  # a named account gets no token
        (container,) = pod["containers"]
        assert container["envFrom"] == OPTIONS["envFrom"]
        names = [e["name"] for e in container["env"]]
        # The spec's variables first, the operator's after them.
        assert names[:2] == ["AWS_ENDPOINT_URL", "AWS_REGION"]
        assert set(TELEMETRY_OFF_ENV) <= set(names[2:])
        assert "MLFLOW_TRACKING_USERNAME" in names[2:]
    # KubeRay's submitter runs `ray job submit`: placed and pulled like the Ray pods, without
    # the spec's variables, Secrets or account.
    submitter = job["spec"]["submitterPodTemplate"]["spec"]
    assert {f: submitter[f] for f in POD_FIELDS} == {f: OPTIONS[f] for f in POD_FIELDS}
    assert "serviceAccountName" not in submitter
    assert "env" not in submitter["containers"][0] and "envFrom" not in submitter["containers"][0]


def test_pod_options_go_to_the_predictor() -> None:
    isvc = build_inferenceservice(deployment(**OPTIONS), 1, tracking_uri="http://mlflow:5000",
                                  image="i", credentials_secret="mlflow-creds")  # fmt: skip
    predictor = isvc["spec"]["predictor"]
    for field in (*POD_FIELDS, "serviceAccountName"):
        assert predictor[field] == OPTIONS[field], field
    assert predictor["automountServiceAccountToken"] is False
    (container,) = predictor["containers"]
    assert container["envFrom"] == OPTIONS["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://s3.store:7070"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_without_pod_options_nothing_is_added() -> None:
    predictor = build_inferenceservice(deployment(), 1, tracking_uri="u", image="i")["spec"][
        "predictor"
    ]
    assert not {*POD_FIELDS, "serviceAccountName"} & set(predictor)
    assert "envFrom" not in predictor["containers"][0]
    head = build_rayjob(trainingrun(), "u")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert not {*POD_FIELDS, "serviceAccountName"} & set(head["template"]["spec"])


@pytest.mark.parametrize(
    ("allowed", "namespace", "ok"),
    [
        ([], "ml", False),
        (["ml-reader"], "ml", True),
        (["ml/ml-reader"], "ml", True),
        (["other/ml-reader"], "ml", False),
        (["ml-reader-2", "ml-reade"], "ml", False),
    ],
)
def test_service_accounts_only_as_the_admin_allows(
    allowed: list[str], namespace: str, ok: bool
) -> None:
    assert service_account_allowed("ml-reader", namespace, allowed) is ok
    settings = OperatorSettings(allowed_service_accounts=allowed)
    run = trainingrun(namespace, serviceAccountName="ml-reader")
    served = deployment(namespace, serviceAccountName="ml-reader")
    for refusal, field in (
        (trainingrun_refusal(run, settings), "spec.ray.serviceAccountName"),
        (deployment_refusal(served, settings), "spec.serviceAccountName"),
    ):
        if ok:
            assert refusal is None
        else:
            assert refusal is not None and refusal.reason == SERVICE_ACCOUNT_NOT_ALLOWED
            assert refusal.message == (
                f"{field}: service account 'ml-reader' is not allowed "
                "(operator.allowedServiceAccounts)"
            )
    # Without a name the pods run as the namespace's default account: always allowed.
    assert trainingrun_refusal(trainingrun(namespace), OperatorSettings()) is None


def test_pod_options_the_spec_no_longer_gives_are_removed_from_the_inferenceservice() -> None:
    with_options = build_inferenceservice(deployment(**OPTIONS), 1, tracking_uri="u", image="i")
    without = build_inferenceservice(deployment(), 1, tracking_uri="u", image="i")
    assert inferenceservice_patch(with_options, with_options) is None
    patch = inferenceservice_patch(with_options, without)
    assert patch is not None
    predictor = patch["spec"]["predictor"]
    for field in (*POD_FIELDS, "serviceAccountName"):
        assert predictor[field] is None, field  # a merge patch's way to remove a field
    assert "envFrom" not in predictor["containers"][0]
    # Given again: the patch sets them.
    back = inferenceservice_patch(without, with_options)
    assert back is not None and back["spec"]["predictor"]["tolerations"] == OPTIONS["tolerations"]
