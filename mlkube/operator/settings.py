"""Operator configuration, read from the environment (MLKUBE_OPERATOR_*)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DeploymentMode = Literal["Serverless", "Knative", "RawDeployment", "Standard"]
# KServe modes in which canaryTrafficPercent is ignored (no revisions to split traffic between).
RAW_DEPLOYMENT_MODES = frozenset({"RawDeployment", "Standard"})


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


@lru_cache(maxsize=1)
def get_settings() -> OperatorSettings:
    return OperatorSettings()
