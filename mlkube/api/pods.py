"""What a spec may say about its pods (Ray head and workers, predictors): environment,
Secrets and ConfigMaps of the same namespace, where the pods may run, image pull Secrets and
a service account. Typed after Kubernetes' own PodSpec fields, so that the CRD refuses a bad
value naming the field. Which service accounts may be named is the admin's decision (the
operator's policy); the operator still mounts no Kubernetes token into these pods."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mlkube.api.common import DNS_SUBDOMAIN_PATTERN, CamelModel

# What Kubernetes accepts as an environment variable's name (a C identifier, plus - and .).
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A label key, with an optional DNS-subdomain prefix ("kubernetes.io/arch", "gpu").
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

# Variables the operator sets itself, or that would send these pods' MLflow traffic (and
# the namespace's MLflow credentials) to a server the admin did not allow, or turn the
# telemetry the operator switches off back on. A spec's `env` may not name them; in
# `envFrom` they lose to the operator's own `env` (Kubernetes lets `env` win), and the
# Ray job's tracking URI comes through Ray's runtime env, which wins over both.
RESERVED_ENV_NAMES = (
    "MLFLOW_REGISTRY_URI",
    "RAY_USAGE_STATS_ENABLED",
    "RAY_USAGE_STATS_REPORT_URL",
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
)
# MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD, _TOKEN, _INSECURE_TLS, _SERVER_CERT_PATH...
RESERVED_ENV_PREFIX = "MLFLOW_TRACKING_"
MAX_ENV = 128
MAX_LIST = 64


def reserved_env_name(name: str) -> bool:
    return name.startswith(RESERVED_ENV_PREFIX) or name in RESERVED_ENV_NAMES


class KeyRef(CamelModel):
    """One key of a Secret or ConfigMap of the pod's own namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool | None = None


class FieldRef(CamelModel):
    """A field of the pod itself, e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, max_length=256)
    api_version: str | None = Field(default=None, max_length=64)


class ResourceFieldRef(CamelModel):
    """A container's request or limit, e.g. limits.memory."""

    resource: str = Field(min_length=1, max_length=64)
    container_name: str | None = Field(default=None, max_length=63)
    divisor: str | None = Field(default=None, max_length=32)


class EnvVarSource(CamelModel):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None
    field_ref: FieldRef | None = None
    resource_field_ref: ResourceFieldRef | None = None


class EnvVar(CamelModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"!self.name.startsWith('{RESERVED_ENV_PREFIX}') && "
                    f"!(self.name in {list(RESERVED_ENV_NAMES)})",
                    "message": "this variable is set by the operator (the MLflow tracking "
                    "and registry URIs and credentials, and the telemetry switches)",
                    "messageExpression": "self.name + ' is set by the operator (the MLflow "
                    "tracking and registry URIs and credentials, and the telemetry switches)'",
                    "fieldPath": ".name",
                },
                {
                    "rule": "has(self.value) != has(self.valueFrom)",
                    "message": "give value or valueFrom, one of them",
                },
            ]
        }
    )

    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME_PATTERN)
    value: str | None = Field(default=None, max_length=32768)
    value_from: EnvVarSource | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if reserved_env_name(name):
            raise ValueError(
                f"{name} is set by the operator (the MLflow tracking and registry URIs and "
                "credentials, and the telemetry switches)"
            )
        return name

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError("give value or valueFrom, one of them")
        return self


class LocalObjectReference(CamelModel):
    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)


class NameRef(LocalObjectReference):
    optional: bool | None = None


class EnvFromSource(CamelModel):
    """All keys of a Secret or ConfigMap of the pod's own namespace, as variables."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretRef) != has(self.configMapRef)",
                    "message": "give secretRef or configMapRef, one of them",
                }
            ]
        }
    )

    prefix: str | None = Field(default=None, max_length=64, pattern=ENV_NAME_PATTERN)
    secret_ref: NameRef | None = None
    config_map_ref: NameRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("give secretRef or configMapRef, one of them")
        return self


class Toleration(CamelModel):
    key: str | None = Field(default=None, max_length=317, pattern=LABEL_KEY_PATTERN)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class NodeSelectorRequirement(CamelModel):
    key: str = Field(max_length=317, pattern=LABEL_KEY_PATTERN)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = Field(default_factory=list, max_length=MAX_LIST)


class NodeSelectorTerm(CamelModel):
    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_LIST
    )
    match_fields: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=MAX_LIST)


class NodeSelector(CamelModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=MAX_LIST)


class PreferredSchedulingTerm(CamelModel):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(CamelModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=MAX_LIST
    )


class LabelSelectorRequirement(CamelModel):
    key: str = Field(max_length=317, pattern=LABEL_KEY_PATTERN)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list, max_length=MAX_LIST)


class LabelSelector(CamelModel):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_LIST
    )


class PodAffinityTerm(CamelModel):
    topology_key: str = Field(min_length=1, max_length=317, pattern=LABEL_KEY_PATTERN)
    label_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    namespaces: list[str] = Field(default_factory=list, max_length=MAX_LIST)


class WeightedPodAffinityTerm(CamelModel):
    weight: int = Field(ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(CamelModel):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_LIST
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_LIST
    )


class Affinity(CamelModel):
    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


class PodOptions(CamelModel):
    """Settings of the pods a resource makes; each goes to the pod or container field of
    the same name. `serviceAccountName` must be one the admin allows
    (operator.allowedServiceAccounts, default none)."""

    env: list[EnvVar] = Field(
        default_factory=list, max_length=MAX_ENV, description="Environment variables."
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        max_length=MAX_LIST,
        description="Every key of a Secret or ConfigMap of this namespace as a variable.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_LIST)
    affinity: Affinity | None = None
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=MAX_LIST
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Run as this ServiceAccount; only names the admin allows "
        "(operator.allowedServiceAccounts). No Kubernetes token is mounted either way.",
    )
