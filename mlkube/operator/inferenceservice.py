"""ModelDeployment -> KServe InferenceService (serving.kserve.io/v1beta1), built as plain data.

The model version is pinned in the predictor's arguments (never an alias): pods are
immutable, following the alias is the operator's job. With spec.models every model's version
is pinned (`--serve-model name=models:/name/3`, one per model); with spec.anyModel the
predictor resolves `name@alias` per request (`--multi-model`), and nothing is pinned.
"""

from __future__ import annotations

import json
from typing import Any

from mlkube.api.common import quantity_value
from mlkube.api.modeldeployment import ModelCache, ModelDeployment
from mlkube.api.registered_model import model_uri
from mlkube.local import TELEMETRY_OFF_ENV
from mlkube.operator.names import (
    ANNOTATION_DEPLOYMENT_MODE,
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_MODEL_VERSIONS,
    LABEL_KSERVE_INFERENCESERVICE,
    LABEL_MODEL_VERSION,
    LABEL_MODELDEPLOYMENT,
    MANAGED_BY,
    OPERATOR_NAME,
    inferenceservice_name,
)
from mlkube.operator.pods import (
    MLFLOW_CLIENT_LABELS,
    POD_OPTION_FIELDS,
    container_env,
    pod_option_fields,
    restricted_pod,
)
from mlkube.operator.settings import OperatorSettings, is_raw_mode

ISVC_API_VERSION = "serving.kserve.io/v1beta1"
# KServe routes to the container with this name.
PREDICTOR_CONTAINER = "kserve-container"
PREDICTOR_MODULE = "mlkube.model_servers"
PRESTOP_SECONDS = "5"
# The predictor's gRPC (Open Inference Protocol v2) port. KServe's raw mode puts every
# declared container port on the Service; Knative allows one port per container.
PREDICTOR_GRPC_PORT = 8081
# The predictor's disk cache of model files: a volume, so that it outlives the container.
CACHE_VOLUME = "model-cache"
CACHE_MOUNT = "/var/cache/mlkube"
# A folder inside the volume, which the predictor makes private to its user (a volume's own
# root belongs to root: an emptyDir's is world-writable, but its mode cannot be changed).
CACHE_DIR = f"{CACHE_MOUNT}/models"
# The group of mlkube's images (Dockerfile: uid/gid 10001), given a claim's files.
CACHE_FS_GROUP = 10001
# The share of an emptyDir's size limit the cache may fill: the rest leaves room for the
# download in progress (the kubelet evicts a pod whose emptyDir exceeds its limit).
CACHE_SHARE_OF_LIMIT = 0.75


def deployment_mode(
    deployment: ModelDeployment, isvc: dict[str, Any] | None, default: str | None
) -> str | None:
    """KServe's deployment mode for this ModelDeployment: its own annotation, else the one
    its InferenceService was made with (a changed default moves no running service), else
    the operator's default."""
    isvc_annotations = ((isvc or {}).get("metadata") or {}).get("annotations") or {}
    return (
        deployment.metadata.annotations.get(ANNOTATION_DEPLOYMENT_MODE)
        or isvc_annotations.get(ANNOTATION_DEPLOYMENT_MODE)
        or default
    )


# spec.models: the version each model's pods serve, by name ({} for spec.anyModel).
ModelVersions = dict[str, int]


def model_args(
    deployment: ModelDeployment, pinned: int | ModelVersions, owner_namespace: str | None
) -> list[str]:
    """What the predictor serves: one pinned version, several pinned versions by name, or
    any model of the namespace at the alias. A server of several models answers only for
    models owned by `owner_namespace` (None: the admin allows shared models)."""
    spec = deployment.spec
    if spec.model is not None:
        assert isinstance(pinned, int), "one model pins one version"
        return [
            "--model-name", spec.model.name,
            "--model-uri", model_uri(spec.model.name, version=pinned),
        ]  # fmt: skip
    assert isinstance(pinned, dict), "several models pin a version each"
    if spec.any_model is not None:
        args = ["--multi-model", "--alias", spec.any_model.alias]
    else:
        args = []
        for name, version in sorted(pinned.items()):
            args += ["--serve-model", f"{name}={model_uri(name, version=version)}"]
    if owner_namespace is not None:
        args += ["--owner-namespace", owner_namespace]
    return args


def predictor_args(
    deployment: ModelDeployment,
    version: int | ModelVersions,
    http_port: int,
    owner_namespace: str | None = None,
) -> list[str]:
    spec = deployment.spec
    args = [
        *model_args(deployment, version, owner_namespace),
        "--ttl-seconds", str(spec.ttl_seconds),
        "--protocol", spec.protocol,
        "--http_port", str(http_port),
        "--grpc_port", str(PREDICTOR_GRPC_PORT),
    ]  # fmt: skip
    args += ["--cache-dir", CACHE_DIR, "--disk-cache-size", str(cache_bound(spec.cache))]
    if spec.limits.max_request_bytes is not None:
        args += ["--max-request-bytes", spec.limits.max_request_bytes]
    if spec.limits.max_request_rows is not None:
        args += ["--max-request-rows", str(spec.limits.max_request_rows)]
    if spec.memory_budget is not None:
        args += ["--memory-budget", spec.memory_budget]
    if isinstance(version, int):
        # A version that cannot load crashes its pod, which the operator reads (see
        # predictor_pod_selector); several models in one process keep serving the others.
        args.append("--exit-if-unloadable")
    return args


def predictor_pod_selector(isvc_name: str, version: int) -> str:
    """The label selector of the predictor pods serving `version` of this InferenceService."""
    return f"{LABEL_KSERVE_INFERENCESERVICE}={isvc_name},{LABEL_MODEL_VERSION}={version}"


def version_annotations(version: int | ModelVersions) -> dict[str, str]:
    """What the InferenceService says it pins, for the next reconcile to read back."""
    if isinstance(version, int):
        return {ANNOTATION_MODEL_VERSION: str(version)}
    return {ANNOTATION_MODEL_VERSIONS: json.dumps(version, sort_keys=True, separators=(",", ":"))}


# The predict URL of a deployment of several models: the client puts the model's name here.
MODEL_PLACEHOLDER = "{model}"


def client_endpoints(
    url: str | None, model: str, protocol: str, raw_mode: bool
) -> tuple[str | None, str | None]:
    """Where a client calls `model` in `protocol` at the InferenceService's `url`: the REST
    predict URL, and for v2 the gRPC address (host:port), which only raw mode's Service
    declares (Knative allows one port). `model` is MODEL_PLACEHOLDER for several models."""
    if not url:
        return None, None
    base = url.rstrip("/")
    if protocol == "v1":
        return f"{base}/v1/models/{model}:predict", None
    host = base.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    grpc = f"{host}:{PREDICTOR_GRPC_PORT}" if raw_mode else None
    return f"{base}/v2/models/{model}/infer", grpc


def cache_bound(cache: ModelCache) -> int:
    """Bytes the predictor's disk cache may hold (its --disk-cache-size)."""
    limit = quantity_value(cache.size_limit)
    share = 1.0 if cache.persistent_volume_claim else CACHE_SHARE_OF_LIMIT
    return int(limit * share)


def cache_volume(cache: ModelCache) -> dict[str, Any]:
    """The disk cache's volume: an emptyDir with the spec's size limit (it lives as long
    as the pod: a restarted container finds its files), or the spec's own claim."""
    if cache.persistent_volume_claim:
        return {
            "name": CACHE_VOLUME,
            "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim},
        }
    return {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": cache.size_limit}}


def build_inferenceservice(
    deployment: ModelDeployment,
    version: int | ModelVersions,
    *,
    tracking_uri: str,
    image: str,
    http_port: int = 8080,
    canary_traffic_percent: int | None = None,
    deployment_mode: str | None = None,
    credentials_secret: str = "",
    owner_namespace: str | None = None,
) -> dict[str, Any]:
    """The InferenceService serving `version` (spec.models: a version per model; anyModel:
    {}); the owner reference is added by the caller.
    `credentials_secret` names the Secret of the deployment's namespace holding its MLflow
    credentials.

    `canary_traffic_percent` sends that share to this version and the rest to the last
    rolled-out one (KServe keeps track of it); it is dropped in raw deployment mode, where
    KServe does not support it.
    """
    spec = deployment.spec
    env = {"MLFLOW_TRACKING_URI": tracking_uri, **TELEMETRY_OFF_ENV}
    # Knative takes a port named http1 (or h2c) only; a Service of two ports needs names.
    ports = [{"name": "http1", "containerPort": http_port, "protocol": "TCP"}]
    if is_raw_mode(deployment_mode):
        # So that gRPC clients reach the predictor through the Service's cluster DNS name.
        ports.append({"name": "h2c", "containerPort": PREDICTOR_GRPC_PORT, "protocol": "TCP"})
    container = {
        "name": PREDICTOR_CONTAINER,
        "image": spec.image or image,
        "command": ["python", "-m", PREDICTOR_MODULE],
        "args": predictor_args(deployment, version, http_port, owner_namespace),
        **container_env(spec, env, credentials_secret),
        "ports": ports,
        "resources": spec.resources.for_container(),
        "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}],
        # Without it a new pod takes traffic before its server listens (seen on a real
        # node: requests refused during every rollout). It answers 200 once the pinned
        # version's artifacts are verified on the pod's disk and it has not failed to load
        # (the model itself loads into memory on the first request).
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": http_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        # A pod being replaced keeps serving until kube-proxy has taken it out of the
        # Service, so no request reaches a server that already stopped listening.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", PRESTOP_SECONDS]}}},
    }
    labels = dict(MLFLOW_CLIENT_LABELS)
    if isinstance(version, int):
        labels[LABEL_MODEL_VERSION] = str(version)
    # KServe's predictor is a pod spec with replica bounds and the pods' labels.
    predictor: dict[str, Any] = restricted_pod(
        [container],
        minReplicas=spec.replicas.min,
        maxReplicas=spec.replicas.max,
        labels=labels,
        volumes=[cache_volume(spec.cache)],
        **pod_option_fields(spec),
    )
    if spec.cache.persistent_volume_claim:
        # A claim's root usually belongs to root: fsGroup makes it writable by the
        # predictor's group (volumes that support ownership management).
        predictor["securityContext"] = {**predictor["securityContext"], "fsGroup": CACHE_FS_GROUP}
    if canary_traffic_percent is not None and not is_raw_mode(deployment_mode):
        predictor["canaryTrafficPercent"] = canary_traffic_percent
    annotations = version_annotations(version)
    if deployment_mode:
        annotations[ANNOTATION_DEPLOYMENT_MODE] = deployment_mode
    return {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": inferenceservice_name(deployment.metadata.name),
            "namespace": deployment.metadata.namespace,
            "labels": {MANAGED_BY: OPERATOR_NAME, LABEL_MODELDEPLOYMENT: deployment.metadata.name},
            "annotations": annotations,
        },
        "spec": {"predictor": predictor},
    }


def inferenceservice_for(
    deployment: ModelDeployment,
    version: int | ModelVersions,
    settings: OperatorSettings,
    *,
    tracking_uri: str,
    canary_traffic_percent: int | None,
    deployment_mode: str | None,
) -> dict[str, Any]:
    """The InferenceService the operator with these settings makes (the predictor's image
    and port, the namespace's MLflow credentials), for the handlers and `operator render`."""
    return build_inferenceservice(
        deployment,
        version,
        tracking_uri=tracking_uri,
        image=settings.predictor_image,
        http_port=settings.predictor_http_port,
        canary_traffic_percent=canary_traffic_percent,
        deployment_mode=deployment_mode,
        credentials_secret=settings.mlflow_credentials_secret,
        owner_namespace=None if settings.allow_shared_models else deployment.metadata.namespace,
    )


def carries(have: Any, want: Any) -> bool:
    """`have` (the live object) says everything `want` (ours) says; the API server may
    have added defaults, which do not count as a difference."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(carries(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(carries(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(want == have)


def inferenceservice_patch(isvc: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes the live InferenceService say what the manifest says, or
    None when it already does. A merge patch keeps fields it does not name, so the ones the
    manifest may leave out (a canary that ended, pod options the spec no longer gives) are
    removed explicitly."""
    predictor = manifest["spec"]["predictor"]
    current = (isvc.get("spec") or {}).get("predictor") or {}
    annotations = manifest["metadata"]["annotations"]
    current_annotations = isvc.get("metadata", {}).get("annotations") or {}
    removable = ("canaryTrafficPercent", *POD_OPTION_FIELDS)
    dropped = [key for key in removable if key in current and key not in predictor]
    # a deployment that went from one model to several (or back) pins the other way
    stale = {
        key: None
        for key in (ANNOTATION_MODEL_VERSION, ANNOTATION_MODEL_VERSIONS)
        if key in current_annotations and key not in annotations
    }
    if (
        carries(current, predictor)
        and not dropped
        and not stale
        and carries(current_annotations, annotations)
    ):
        return None
    return {
        "metadata": {"annotations": {**stale, **annotations}},
        "spec": {"predictor": {**dict.fromkeys(removable), **predictor}},
    }
