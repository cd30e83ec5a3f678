"""Operator configuration, read from the environment (MLKUBE_OPERATOR_*)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlkube.api.common import quantity_value

DeploymentMode = Literal["Serverless", "Knative", "RawDeployment", "Standard"]
# KServe modes in which canaryTrafficPercent is ignored (no revisions to split traffic between).
RAW_DEPLOYMENT_MODES = frozenset({"RawDeployment", "Standard"})


def is_raw_mode(deployment_mode: str | None) -> bool:
    return deployment_mode in RAW_DEPLOYMENT_MODES


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLKUBE_OPERATOR_", extra="ignore")

    mlflow_tracking_uri: str = Field(
        default="http://mlflow:5000",
        validation_alias=AliasChoices("MLKUBE_OPERATOR_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="Used when a resource's spec.mlflow.trackingUri is omitted.",
    )
    # Hosts (`host` or `host:port`) a spec's mlflow.trackingUri may name besides the host
    # of mlflow_tracking_uri. The operator's MLflow credentials go to neither: only to
    # mlflow_tracking_uri itself (mlkube/operator/tracking.py).
    mlflow_allowed_hosts: list[str] = Field(default_factory=list)
    predictor_image: str = "mlkube/runtime:0.1.0"
    # What a spec may ask for (mlkube/operator/policy.py): image prefixes besides
    # predictor_image itself (compared in full form: "mlkube/x" is "docker.io/mlkube/x"),
    # and upper bounds on Ray workers, on one container's cpu and memory, and on replicas.
    allowed_images: list[str] = Field(default_factory=list)
    max_ray_workers: int = Field(default=8, ge=0)
    max_cpu: str = "8"
    max_memory: str = "32Gi"
    max_replicas: int = Field(default=10, ge=1)
    # ServiceAccounts a spec's serviceAccountName may name: "name" (in any namespace) or
    # "namespace/name". Empty: none, so every pod runs as its namespace's default account.
    allowed_service_accounts: list[str] = Field(default_factory=list)
    # A warm RayCluster (spec.ray.cluster.warm) is deleted after this long with no RayJob on
    # it; 0: TrainingRuns may not ask for warm clusters.
    warm_cluster_idle_seconds: float = Field(default=600.0, ge=0)
    # A Secret, in the namespace of each TrainingRun and ModelDeployment, whose keys
    # username/password or token become MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN in the
    # Ray and predictor pods (each namespace its own MLflow identity). Empty: none.
    mlflow_credentials_secret: str = ""
    # Registered models belong to the namespace that first registered one of their
    # versions; True lets every namespace register, promote and deploy any model.
    allow_shared_models: bool = False
    predictor_http_port: int = 8080
    kserve_deployment_mode: DeploymentMode | None = Field(
        default=None,
        description="Annotate InferenceServices with serving.kserve.io/deploymentMode.",
    )
    # How often a ModelDeployment's alias is resolved through MLflow.
    alias_poll_seconds: float = Field(default=30.0, gt=0)
    # How often a TrainingRun's status is synced from its RayJob and MLflow, and how often a
    # ModelDeployment's status is synced from its InferenceService.
    status_poll_seconds: float = Field(default=5.0, gt=0)
    # A new version whose predictor is not ready this long after its rollout began counts as
    # failed, and traffic stays on the served version (like a Deployment's
    # progressDeadlineSeconds, which KServe fixes at 600 s in raw mode).
    rollout_timeout_seconds: float = Field(default=600.0, gt=0)
    # jobStatus FAILED while jobDeploymentStatus still says Running counts as failed after this.
    failed_job_grace_seconds: float = Field(default=30.0, ge=0)
    # MLflow: one request's timeout, and the backoff between attempts while it is unreachable.
    mlflow_timeout_seconds: float = Field(default=5.0, gt=0)
    mlflow_backoff_initial_seconds: float = Field(default=2.0, gt=0)
    mlflow_backoff_max_seconds: float = Field(default=120.0, gt=0)
    # Empty: all namespaces.
    namespaces: list[str] = Field(default_factory=list)
    metrics_port: int = Field(default=9090, ge=0, description="0 disables /metrics.")
    health_port: int = Field(default=8081, ge=0, description="0 disables /healthz.")
    log_format: Literal["plain", "full", "json"] = "json"
    # Sync handlers run in a thread pool: API and MLflow calls block, creates come in bursts.
    max_workers: int = Field(default=16, ge=1)
    # Server-side watch timeout: a short one lets the operator stop promptly (tests).
    watch_timeout_seconds: int = Field(default=300, ge=1)

    @field_validator("max_cpu", "max_memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        quantity_value(value)
        return value


@lru_cache(maxsize=1)
def get_settings() -> OperatorSettings:
    return OperatorSettings()
