"""TrainingRun -> KubeRay RayJob (ray.io/v1), built as plain data."""

from __future__ import annotations

import json
import math
import shlex
from typing import Any

import yaml

from mlkube.api.common import Resources
from mlkube.api.trainingrun import RaySettings, TrainingRun
from mlkube.local import TELEMETRY_OFF_ENV
from mlkube.operator.names import LABEL_TRAININGRUN, MANAGED_BY, OPERATOR_NAME, rayjob_name
from mlkube.operator.pods import (
    MLFLOW_CLIENT_LABELS,
    container_env,
    pod_option_fields,
    restricted_pod,
)
from mlkube.operator.settings import OperatorSettings

RAYJOB_API_VERSION = "ray.io/v1"
# The one key KubeRay reads in a RayJob's clusterSelector: the RayCluster's name.
RAY_CLUSTER_SELECTOR_KEY = "ray.io/cluster"
TRAIN_MODULE = "mlkube.flows.train"
# On the operator's warm clusters the head keeps the train flow imported in a zygote
# (mlkube.flows.zygote, started beside Ray: rayclusters.zygote_start); a job's entrypoint is
# its thin client, which runs `python -m mlkube.flows.train` itself when the zygote is not up.
ZYGOTE_MODULE = "mlkube.flows.zygote"
ZYGOTE_SOCKET = "/tmp/mlkube-zygote/train.sock"
# Imported by the zygote beside the train flow: its `python -m` entry (mlkube.cli), Ray
# Tune, which a run imports when its search starts (2.5 s more on these cores), and the
# built-in tasks' libraries (scikit-learn, skops), which it imports as it reads its data.
ZYGOTE_PRELOAD = ("mlkube.cli", "ray.tune", "mlkube.training.preload")
# The train flow's flag that lets it register versions of a model another namespace owns.
SHARED_MODELS_FLAG = "--allow-shared-models"
# The train flow's flag that starts its trial workers as it connects to Ray
# (mlkube.training.trial_workers). Given on warm clusters, where it was measured to help
# (14.5 s to the first trial without, 12.6 s with); on a run's own head of 0.8 CPU the early
# worker slowed the run's start instead (60.0 s without, 64.7 s with).
TRIAL_WORKERS_AHEAD_FLAG = "--trial-workers-ahead"
# KubeRay's own default for the submitter container (name, requests and limits); given here
# so that its pod template is ours: restricted, no token. KubeRay fills in the command.
SUBMITTER_CONTAINER = "ray-job-submitter"
SUBMITTER_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "200Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}


def handed_over(run: TrainingRun) -> dict[str, Any]:
    """The TrainingRun as the train flow receives it: identity and spec, no status."""
    meta = run.metadata
    metadata = {"name": meta.name, "namespace": meta.namespace, "uid": meta.uid}
    return {
        "apiVersion": run.api_version,
        "kind": run.kind,
        "metadata": {k: v for k, v in metadata.items() if v is not None},
        "spec": run.spec.to_k8s(),
    }


def entrypoint(
    run: TrainingRun, allow_shared_models: bool = False, through_zygote: bool = False
) -> str:
    spec_json = json.dumps(handed_over(run), separators=(",", ":"), sort_keys=True)
    flags = f" {SHARED_MODELS_FLAG}" if allow_shared_models else ""
    start = f"python -m {TRAIN_MODULE}"
    if through_zygote:
        start = f"python -m {ZYGOTE_MODULE} run --socket {ZYGOTE_SOCKET} {TRAIN_MODULE}"
        flags += f" {TRIAL_WORKERS_AHEAD_FLAG}"
    return f"{start} --spec-json {shlex.quote(spec_json)}{flags}"


def on_warm_cluster(run: TrainingRun, cluster_name: str | None) -> bool:
    choice = run.spec.ray.cluster
    return cluster_name is not None and choice is not None and bool(choice.warm)


# Where spec.tuning.storage's claim is mounted on every Ray pod; the train flow keeps Tune's
# state of the search there (mlkube.training.tune.TUNE_STORAGE_ENV).
TUNE_STORAGE_VOLUME = "tune-state"
TUNE_STORAGE_PATH = "/mlkube/tune-state"
TUNE_STORAGE_ENV = "MLKUBE_TUNE_STORAGE"


def storage_env(run: TrainingRun) -> dict[str, str]:
    return {TUNE_STORAGE_ENV: TUNE_STORAGE_PATH} if run.spec.tuning.storage else {}


def runtime_env_yaml(tracking_uri: str, extra: dict[str, str] | None = None) -> str:
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri, **TELEMETRY_OFF_ENV, **(extra or {})}
    return yaml.safe_dump({"env_vars": env_vars}, sort_keys=True)


def trial_pod_gpus(run: TrainingRun) -> int:
    """GPUs on a pod that runs trials: enough for one trial (a fraction needs a whole one)."""
    return math.ceil(run.spec.resources.gpu)


def _pod_template(
    run: TrainingRun,
    container_name: str,
    resources: Resources,
    gpus: int,
    credentials_secret: str,
) -> dict[str, Any]:
    ray = run.spec.ray
    operator_env = {**TELEMETRY_OFF_ENV, **storage_env(run)}
    container: dict[str, Any] = {
        "name": container_name,
        "image": ray.image,
        "resources": resources.for_container(gpu=gpus),
        **container_env(ray, operator_env, credentials_secret),
    }
    spec_fields = pod_option_fields(ray)
    storage = run.spec.tuning.storage
    if storage is not None:
        container["volumeMounts"] = [{"name": TUNE_STORAGE_VOLUME, "mountPath": TUNE_STORAGE_PATH}]
        claim = {"claimName": storage.claim_name}
        spec_fields["volumes"] = [{"name": TUNE_STORAGE_VOLUME, "persistentVolumeClaim": claim}]
    return {
        "metadata": {"labels": dict(MLFLOW_CLIENT_LABELS)},
        "spec": restricted_pod([container], **spec_fields),
    }


def submitter_template(ray: RaySettings) -> dict[str, Any]:
    """The pod of KubeRay's submitter Job (it runs `ray job submit` against the head): placed
    and pulled like the Ray pods, with neither the spec's variables nor its service account."""
    container = {"name": SUBMITTER_CONTAINER, "image": ray.image, "resources": SUBMITTER_RESOURCES}
    options = pod_option_fields(ray, service_account=False)
    return {"spec": restricted_pod([container], restartPolicy="Never", **options)}


def ray_cluster_spec(run: TrainingRun, credentials_secret: str = "") -> dict[str, Any]:
    """The head, and the worker group when there is one. The pods that run trials (the
    workers, or the head alone) get GPUs for spec.resources.gpu unless spec.ray says how many;
    KubeRay tells Ray about them from the nvidia.com/gpu limit."""
    ray = run.spec.ray
    trial_gpus = trial_pod_gpus(run)
    head_gpus = 0 if ray.workers > 0 else trial_gpus
    cluster: dict[str, Any] = {
        "headGroupSpec": {
            "rayStartParams": {},
            "template": _pod_template(run, "ray-head", ray.head, head_gpus, credentials_secret),
        }
    }
    if ray.workers > 0:
        cluster["workerGroupSpecs"] = [
            {
                "groupName": "workers",
                "replicas": ray.workers,
                "minReplicas": ray.workers,
                "maxReplicas": ray.workers,
                "rayStartParams": {},
                "template": _pod_template(
                    run, "ray-worker", ray.worker, trial_gpus, credentials_secret
                ),
            }
        ]
    return cluster


def build_rayjob(
    run: TrainingRun,
    default_tracking_uri: str,
    *,
    credentials_secret: str = "",
    allow_shared_models: bool = False,
    cluster_name: str | None = None,
) -> dict[str, Any]:
    """The RayJob for a TrainingRun; the owner reference is added by the caller (kopf.adopt).
    `credentials_secret` names the Secret of the run's namespace holding its MLflow
    credentials; `allow_shared_models` lets the train flow use models of other namespaces.
    `cluster_name`: an existing RayCluster to run on (KubeRay's clusterSelector; the cluster
    stays when the job ends), else a cluster of the job's own."""
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(
            run, allow_shared_models, through_zygote=on_warm_cluster(run, cluster_name)
        ),
        "runtimeEnvYAML": runtime_env_yaml(
            run.spec.mlflow.tracking_uri_or(default_tracking_uri), storage_env(run)
        ),
        "submitterPodTemplate": submitter_template(run.spec.ray),
    }
    if cluster_name:
        spec["clusterSelector"] = {RAY_CLUSTER_SELECTOR_KEY: cluster_name}
        # KubeRay submits through the cluster's dashboard itself: no submitter pod to
        # start before the job (the cluster is up already; pods are the wait).
        spec["submissionMode"] = "HTTPMode"
        del spec["submitterPodTemplate"]
    else:
        spec["rayClusterSpec"] = ray_cluster_spec(run, credentials_secret)
        # KubeRay's default (false) leaves the Ray cluster running after the job ends.
        spec["shutdownAfterJobFinishes"] = True
        spec["ttlSecondsAfterFinished"] = run.spec.ttl_seconds_after_finished
    if run.spec.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = run.spec.active_deadline_seconds
    if run.spec.ray.retries:
        # Each retry is a new Ray cluster; with spec.tuning.storage its driver resumes the
        # search where the last one stopped.
        spec["backoffLimit"] = run.spec.ray.retries
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(run.metadata.name),
            "namespace": run.metadata.namespace,
            "labels": {MANAGED_BY: OPERATOR_NAME, LABEL_TRAININGRUN: run.metadata.name},
        },
        "spec": spec,
    }


def rayjob_for(
    run: TrainingRun, settings: OperatorSettings, cluster_name: str | None = None
) -> dict[str, Any]:
    """The RayJob the operator with these settings makes (its MLflow, the namespace's
    MLflow credentials, shared models or not), for the handlers and `operator render`;
    `cluster_name` as in build_rayjob."""
    return build_rayjob(
        run,
        settings.mlflow_tracking_uri,
        credentials_secret=settings.mlflow_credentials_secret,
        allow_shared_models=settings.allow_shared_models,
        cluster_name=cluster_name,
    )
