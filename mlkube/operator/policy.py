"""What a spec may ask of the cluster: the admin's image allow-list, the service accounts a
pod may run as, and upper bounds on Ray workers, container sizes and replicas (operator
settings, chart values). Pure.

Creating a TrainingRun or ModelDeployment makes pods run: without these checks it would be
as strong as creating a pod with any image and any size. A refused resource gets a status
condition with a fixed reason and a message naming the field; the operator creates nothing
for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel

from mlkube.api.common import Resources, quantity_value
from mlkube.api.modeldeployment import ModelDeployment
from mlkube.api.trainingrun import TrainingRun
from mlkube.operator.settings import OperatorSettings

# Condition/event reasons of a refusal.
IMAGE_NOT_ALLOWED = "ImageNotAllowed"
OVER_LIMIT = "OverLimit"
SERVICE_ACCOUNT_NOT_ALLOWED = "ServiceAccountNotAllowed"
RAY_CLUSTER_NOT_FOUND = "RayClusterNotFound"
WARM_CLUSTERS_OFF = "WarmClustersOff"


class Refusal(BaseModel):
    reason: str
    message: str


def full_image_name(reference: str) -> str:
    """An image reference as the container runtime reads it: a first path component
    without '.' or ':' (and not localhost) is a Docker Hub repository, and a name without
    '/' is one of Docker Hub's library images ("mlkube/x:1" -> "docker.io/mlkube/x:1")."""
    first, slash, _ = reference.partition("/")
    if not slash:
        return f"docker.io/library/{reference}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{reference}"
    return reference


def image_allowed(image: str, own_image: str, prefixes: Iterable[str]) -> bool:
    """The operator's own image, or one under an allowed prefix. A prefix matches whole
    components: "registry.local/team" allows "registry.local/team/x:1", not
    "registry.local/team-evil/x:1"."""
    full = full_image_name(image)
    if full == full_image_name(own_image):
        return True
    for prefix in prefixes:
        allowed = full_image_name(prefix.strip())
        if not prefix.strip() or not full.startswith(allowed):
            continue
        if len(full) == len(allowed) or allowed[-1] in "/:@" or full[len(allowed)] in "/:@":
            return True
    return False


def _image(field: str, image: str, settings: OperatorSettings) -> Refusal | None:
    if image_allowed(image, settings.predictor_image, settings.allowed_images):
        return None
    return Refusal(
        reason=IMAGE_NOT_ALLOWED,
        message=f"{field}: image {image!r} is not allowed (operator.allowedImages)",
    )


def service_account_allowed(name: str, namespace: str, allowed: Iterable[str]) -> bool:
    """An entry "name" allows that account in every namespace, "namespace/name" in one."""
    return any(entry.strip() in (name, f"{namespace}/{name}") for entry in allowed)


def _service_account(
    field: str, name: str | None, namespace: str | None, settings: OperatorSettings
) -> Refusal | None:
    if name is None or service_account_allowed(
        name, namespace or "", settings.allowed_service_accounts
    ):
        return None
    return Refusal(
        reason=SERVICE_ACCOUNT_NOT_ALLOWED,
        message=f"{field}: service account {name!r} is not allowed "
        "(operator.allowedServiceAccounts)",
    )


def _over(field: str, value: object, limit: object, setting: str) -> Refusal:
    return Refusal(
        reason=OVER_LIMIT,
        message=f"{field}: {value} is over the limit {limit} (operator.{setting})",
    )


def _resources(field: str, resources: Resources, settings: OperatorSettings) -> Refusal | None:
    if quantity_value(resources.cpu) > quantity_value(settings.max_cpu):
        return _over(f"{field}.cpu", resources.cpu, settings.max_cpu, "maxCpu")
    if quantity_value(resources.memory) > quantity_value(settings.max_memory):
        return _over(f"{field}.memory", resources.memory, settings.max_memory, "maxMemory")
    return None


def trainingrun_refusal(run: TrainingRun, settings: OperatorSettings) -> Refusal | None:
    """Why the TrainingRun must not run, or None."""
    ray = run.spec.ray
    if ray.workers > settings.max_ray_workers:
        return _over("spec.ray.workers", ray.workers, settings.max_ray_workers, "maxRayWorkers")
    return (
        _image("spec.ray.image", ray.image, settings)
        or _service_account(
            "spec.ray.serviceAccountName",
            ray.service_account_name,
            run.metadata.namespace,
            settings,
        )
        or _resources("spec.ray.head", ray.head, settings)
        or (_resources("spec.ray.worker", ray.worker, settings) if ray.workers else None)
    )


def deployment_refusal(deployment: ModelDeployment, settings: OperatorSettings) -> Refusal | None:
    """Why the ModelDeployment must not be served, or None."""
    spec = deployment.spec
    if spec.replicas.max > settings.max_replicas:
        return _over("spec.replicas.max", spec.replicas.max, settings.max_replicas, "maxReplicas")
    return (
        (_image("spec.image", spec.image, settings) if spec.image else None)
        or _service_account(
            "spec.serviceAccountName",
            spec.service_account_name,
            deployment.metadata.namespace,
            settings,
        )
        or _resources("spec.resources", spec.resources, settings)
    )


def raycluster_refusal(
    field: str, name: str, images: Iterable[str], settings: OperatorSettings
) -> Refusal | None:
    """An existing RayCluster a TrainingRun names runs the train flow's code: it must run
    allowed images only, as the run's own cluster would."""
    for image in images:
        if not image_allowed(image, settings.predictor_image, settings.allowed_images):
            return Refusal(
                reason=IMAGE_NOT_ALLOWED,
                message=f"{field}: RayCluster {name!r} runs image {image!r}, which is not "
                "allowed (operator.allowedImages)",
            )
    return None
