"""Finding 6: a spec asks the cluster only for what the admin allows (image prefixes, bounds on
workers, cpu, memory and replicas). The attack is a TrainingRun or ModelDeployment naming
another image or a huge size: it fails at once with a fixed reason naming the field, and the
operator creates nothing (the handlers run here with no API server at all: a create would
fail the test)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf
import pytest

from mlkube.api import ModelDeployment, TrainingRun
from mlkube.operator import handlers
from mlkube.operator.policy import (
    IMAGE_NOT_ALLOWED,
    OVER_LIMIT,
    deployment_refusal,
    full_image_name,
    image_allowed,
    trainingrun_refusal,
)
from mlkube.operator.settings import OperatorSettings
from tests.unit.test_operator_handlers_tracking import body

SETTINGS = OperatorSettings(
    predictor_image="mlkube/runtime:0.1.0",
    allowed_images=["registry.local/team", "ghcr.io/org/ml:"],
    max_ray_workers=4,
    max_cpu="4",
    max_memory="8Gi",
    max_replicas=3,
    mlflow_allowed_hosts=[],
)


def run(**ray: Any) -> TrainingRun:
    return TrainingRun.model_validate({
        "metadata": {"name": "t", "namespace": "team-b", "uid": "u"},
        "spec": {"task": "insurance", "model": {"name": "m"}, "ray": ray},
    })  # fmt: skip


def deployment(**spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "metadata": {"name": "d", "namespace": "team-b", "uid": "u"},
        "spec": {"model": {"name": "m", "version": 1}, **spec},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("reference", "full"),
    [
        ("mlkube/runtime:0.1.0", "docker.io/mlkube/runtime:0.1.0"),
        ("python:3.11", "docker.io/library/python:3.11"),
        ("docker.io/mlkube/runtime:0.1.0", "docker.io/mlkube/runtime:0.1.0"),
        ("registry.local/team/x:1", "registry.local/team/x:1"),
        ("localhost/x:1", "localhost/x:1"),
        ("registry:5000/x", "registry:5000/x"),
    ],
)
def test_images_compare_in_their_full_form(reference: str, full: str) -> None:
    assert full_image_name(reference) == full


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("mlkube/runtime:0.1.0", True),  # the predictor image
        ("docker.io/mlkube/runtime:0.1.0", True),  # the same, written in full
        ("mlkube/runtime:0.2.0", False),  # its repository is not a prefix
        ("registry.local/team/x:1", True),
        ("registry.local/team-evil/x:1", False),  # a prefix matches whole components
        ("registry.local/teamx:1", False),
        ("ghcr.io/org/ml:2", True),
        ("ghcr.io/org/ml-evil:2", False),
        ("evil.io/registry.local/team/x:1", False),
        ("python:3.11", False),
    ],
)
def test_image_allow_list(image: str, allowed: bool) -> None:
    assert image_allowed(image, SETTINGS.predictor_image, SETTINGS.allowed_images) is allowed


@pytest.mark.parametrize(
    ("ray", "reason", "message"),
    [
        ({"image": "evil.io/miner:1"}, IMAGE_NOT_ALLOWED,
         "spec.ray.image: image 'evil.io/miner:1' is not allowed (operator.allowedImages)"),
        ({"workers": 1000}, OVER_LIMIT,
         "spec.ray.workers: 1000 is over the limit 4 (operator.maxRayWorkers)"),
        ({"head": {"cpu": "64"}}, OVER_LIMIT,
         "spec.ray.head.cpu: 64 is over the limit 4 (operator.maxCpu)"),
        ({"workers": 2, "worker": {"memory": "1Ti"}}, OVER_LIMIT,
         "spec.ray.worker.memory: 1Ti is over the limit 8Gi (operator.maxMemory)"),
        ({"head": {"cpu": "4001m"}}, OVER_LIMIT,
         "spec.ray.head.cpu: 4001m is over the limit 4 (operator.maxCpu)"),
    ],
)  # fmt: skip
def test_trainingrun_over_what_is_allowed_is_refused_naming_the_field(
    ray: dict[str, Any], reason: str, message: str
) -> None:
    refusal = trainingrun_refusal(run(**ray), SETTINGS)
    assert refusal is not None and (refusal.reason, refusal.message) == (reason, message)


def test_trainingrun_within_bounds_passes() -> None:
    within = run(image="registry.local/team/ray:2", workers=4, head={"cpu": "4", "memory": "8Gi"},
                 worker={"cpu": "3500m", "memory": "8192Mi"})  # fmt: skip
    assert trainingrun_refusal(within, SETTINGS) is None
    # Worker sizes do not matter without workers.
    assert trainingrun_refusal(run(workers=0, worker={"cpu": "99"}), SETTINGS) is None


@pytest.mark.parametrize(
    ("spec", "reason", "field"),
    [
        ({"image": "evil.io/x:1"}, IMAGE_NOT_ALLOWED, "spec.image"),
        ({"replicas": {"min": 1, "max": 500}}, OVER_LIMIT, "spec.replicas.max"),
        ({"resources": {"cpu": "100"}}, OVER_LIMIT, "spec.resources.cpu"),
        ({"resources": {"memory": "9Gi"}}, OVER_LIMIT, "spec.resources.memory"),
    ],
)
def test_modeldeployment_over_what_is_allowed_is_refused_naming_the_field(
    spec: dict[str, Any], reason: str, field: str
) -> None:
    refusal = deployment_refusal(deployment(**spec), SETTINGS)
    assert refusal is not None and refusal.reason == reason
    assert refusal.message.startswith(f"{field}: ")
    assert deployment_refusal(deployment(), SETTINGS) is None


def test_settings_refuse_a_bound_that_is_no_quantity() -> None:
    with pytest.raises(ValueError, match="max_cpu"):
        OperatorSettings(max_cpu="lots")


# --------------------------------------------------------------------------- handlers


@pytest.fixture(autouse=True)
def admin_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "SETTINGS", SETTINGS)


def test_a_trainingrun_with_another_image_fails_and_creates_no_rayjob(
    events: Callable[[], list[Any]],
) -> None:
    attack = body("TrainingRun", {"task": "insurance", "model": {"name": "m"},
                                  "ray": {"image": "evil.io/miner:1", "workers": 1}})  # fmt: skip
    patch = kopf.Patch()
    handlers.create_rayjob(body=attack, meta=attack.metadata, patch=patch)
    status = patch["status"]
    assert status["phase"] == "Failed" and "rayJobName" not in status
    [succeeded] = status["conditions"]
    assert (succeeded["status"], succeeded["reason"]) == ("False", IMAGE_NOT_ALLOWED)
    assert succeeded["message"].startswith("spec.ray.image: ")
    assert [(e.type, e.reason) for e in events()] == [("Warning", IMAGE_NOT_ALLOWED)]


def test_a_modeldeployment_with_many_replicas_fails_and_creates_no_inferenceservice(
    events: Callable[[], list[Any]],
) -> None:
    attack = body("ModelDeployment", {"model": {"name": "m", "version": 1},
                                      "replicas": {"min": 1, "max": 1000}})  # fmt: skip
    patch = kopf.Patch()
    handlers.deployment_changed(body=attack, meta=attack.metadata, patch=patch)
    status = patch["status"]
    assert status["phase"] == "Failed" and "inferenceServiceName" not in status
    reasons = {c["type"]: c["reason"] for c in status["conditions"]}
    assert reasons == {"ModelResolved": OVER_LIMIT, "Ready": OVER_LIMIT}
    assert status["message"].startswith("spec.replicas.max: 1000 is over the limit 3")
    assert [(e.type, e.reason) for e in events()] == [("Warning", OVER_LIMIT)]
