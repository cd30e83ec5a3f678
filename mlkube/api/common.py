"""Shapes shared by both custom resources: camelCase fields, conditions, metadata."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "mlkube.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes quantities such as "500m", "2", "4Gi".
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
# A size in bytes, as Kubernetes writes one ("64Mi", "1G", "1048576"); no milli-bytes.
BYTE_SIZE_PATTERN = r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# The extended resource NVIDIA's device plugin offers.
GPU_RESOURCE = "nvidia.com/gpu"
# What each suffix of a Kubernetes quantity multiplies by ("m" is milli: CPU only).
QUANTITY_FACTORS: dict[str | None, float] = {
    None: 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|K|Ki|M|Mi|G|Gi|T|Ti)?$")


def quantity_value(text: str) -> float:
    """The amount a Kubernetes quantity stands for: "500m" -> 0.5, "2Gi" -> 2147483648."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"not a quantity like 500m, 2 or 4Gi: {text!r}")
    return float(match.group(1)) * QUANTITY_FACTORS[match.group(2)]


class CamelModel(BaseModel):
    """Fields are snake_case in Python and camelCase in YAML; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
    )

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata mlkube reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resources(CamelModel):
    """CPU and memory for one container, as Kubernetes quantities (requests = limits)."""

    cpu: str = Field(default="1", pattern=QUANTITY_PATTERN)
    memory: str = Field(default="2Gi", pattern=QUANTITY_PATTERN)
    gpu: int | None = Field(
        default=None, ge=0, le=64, description="NVIDIA GPUs (the nvidia.com/gpu limit)."
    )

    def for_container(self, gpu: int | None = None) -> dict[str, dict[str, str]]:
        """A container's `resources`: requests and limits both these amounts; GPUs (these or
        `gpu` when these say none) as a limit, which Kubernetes also takes as the request."""
        amounts = {"cpu": self.cpu, "memory": self.memory}
        resources = {"requests": dict(amounts), "limits": dict(amounts)}
        gpus = self.gpu if self.gpu is not None else gpu
        if gpus:
            resources["limits"][GPU_RESOURCE] = str(gpus)
        return resources


class MlflowSettings(CamelModel):
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; the operator's default when omitted."
    )

    def tracking_uri_or(self, default: str) -> str:
        """The spec's tracking URI, else `default`: the operator's own on a cluster, local
        mode's (MLFLOW_TRACKING_URI or the local store) on one machine."""
        return self.tracking_uri or default


class Condition(CamelModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
