"""What every pod the operator has made (Ray head, workers, submitter; predictors) runs with:
no Kubernetes token, the restricted Pod Security profile, MLflow credentials only from a
Secret of the pod's own namespace, and what the spec's pod options add (already checked by
the CRD and the admin's policy). Plain data."""

from __future__ import annotations

from typing import Any

from mlkube.api.pods import PodOptions

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


# Pod-level fields a spec's pod options set; a field the spec no longer names is removed
# from the live object (mlkube/operator/handlers.py patches with a merge patch).
SCHEDULING_FIELDS = ("nodeSelector", "tolerations", "affinity", "imagePullSecrets")
POD_OPTION_FIELDS = (*SCHEDULING_FIELDS, "serviceAccountName")


def _given(options: PodOptions) -> dict[str, Any]:
    """The options as the spec gave them (no empty lists for fields it left out)."""
    return options.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")


def pod_option_fields(options: PodOptions, *, service_account: bool = True) -> dict[str, Any]:
    """The pod spec fields of these options (without the service account for pods that run
    no user code: KubeRay's submitter). The scheduling fields and pull Secrets go to every
    pod, so that all of a resource's pods can be placed and pull their image."""
    data = _given(options)
    names = POD_OPTION_FIELDS if service_account else SCHEDULING_FIELDS
    return {name: data[name] for name in names if data.get(name)}


def container_env(
    options: PodOptions, operator_env: dict[str, str], credentials_secret: str
) -> dict[str, Any]:
    """A container's `env` and `envFrom`: the spec's variables first, then the operator's
    own (which the spec's `env` may not name, api/pods.py), so that a Secret read through
    `envFrom` cannot override them either: Kubernetes lets `env` win over `envFrom`."""
    data = _given(options)
    env = list(data.get("env", []))
    env += [{"name": k, "value": v} for k, v in sorted(operator_env.items())]
    env += mlflow_credentials_env(credentials_secret)
    fields: dict[str, Any] = {"env": env}
    if data.get("envFrom"):
        fields["envFrom"] = data["envFrom"]
    return fields
