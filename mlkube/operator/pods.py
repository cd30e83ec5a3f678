"""What every pod the operator has made (Ray head, workers, submitter; predictors) runs with:
no Kubernetes token, the restricted Pod Security profile, and MLflow credentials only from a
Secret of the pod's own namespace. Plain data."""

from __future__ import annotations

from typing import Any

# The "restricted" Pod Security Standard. The images run as uid 10001 (Dockerfile); an
# allowed image that runs as root does not start (runAsNonRoot), which is the point.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# On every pod that talks to MLflow (Ray head and workers, predictors): the chart's
# NetworkPolicy lets pods with this label, in the namespaces it selects, reach its MLflow.
MLFLOW_CLIENT_LABELS = {"mlkube.io/mlflow-client": "true"}
# Secret keys -> the environment variables MLflow's clients read.
MLFLOW_CREDENTIAL_KEYS = {
    "username": "MLFLOW_TRACKING_USERNAME",
    "password": "MLFLOW_TRACKING_PASSWORD",
    "token": "MLFLOW_TRACKING_TOKEN",
}


def restricted_pod(containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A pod spec of these containers, each restricted, with no service account token:
    nothing in these pods talks to the Kubernetes API, and user code runs in them."""
    restricted = [
        {**container, "securityContext": dict(CONTAINER_SECURITY_CONTEXT)}
        for container in containers
    ]
    return {
        **spec,
        "automountServiceAccountToken": False,
        "securityContext": dict(POD_SECURITY_CONTEXT),
        "containers": restricted,
    }


def mlflow_credentials_env(secret: str) -> list[dict[str, Any]]:
    """Env entries reading MLflow credentials from `secret` (keys username and password, or
    token; each optional, so a Secret may hold either pair). None without a Secret."""
    if not secret:
        return []
    return [
        {
            "name": variable,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}},
        }
        for key, variable in MLFLOW_CREDENTIAL_KEYS.items()
    ]
