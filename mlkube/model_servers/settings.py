"""What one predictor process serves and how: the validated boundary of the CLI and entrypoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlkube.api.common import BYTE_SIZE_PATTERN, quantity_value
from mlkube.api.registered_model import DEFAULT_ALIAS, MODEL_NAME_PATTERN
from mlkube.local import mlkube_home

_BYTE_SIZE = re.compile(BYTE_SIZE_PATTERN)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def parse_quantity(text: str | int) -> int:
    """Bytes in a Kubernetes-style quantity: "512Mi", "1G", "1048576"."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError("must not be negative")
        return text
    if not _BYTE_SIZE.match(text.strip()):
        raise ValueError(f"not a size like 512Mi or 2Gi: {text!r}")
    return int(quantity_value(text))


def default_cache_dir() -> Path:
    return mlkube_home() / "model-cache"


class ServerSettings(BaseModel):
    """Everything the server needs; built by `python -m mlkube.model_servers` or `mlkube serve`."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str | None = Field(
        default=None, description="models:/name/version, models:/name@alias, runs:/... or a path"
    )
    model_name: str | None = Field(default=None, description="Endpoint name; from the URI if unset")
    multi_model: bool = Field(default=False, description="Serve any registered model by name")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Several models by endpoint name -> model URI (--serve-model NAME=URI)",
    )
    owner_namespace: str | None = Field(
        default=None,
        description="Serve only registered models whose owner tag is this namespace; "
        "others are not found (404)",
    )
    alias: str = Field(default=DEFAULT_ALIAS, description="Alias resolved in multi-model mode")
    ttl_seconds: float = Field(
        default=300, ge=0, description="Idle seconds before eviction; 0 keeps"
    )
    memory_budget: int | None = Field(
        default=None, description="Resident bytes of loaded models (LRU beyond it)"
    )
    protocol: Literal["v1", "v2"] = "v1"
    host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_port: int = Field(default=8081, ge=0, le=65535)
    enable_grpc: bool = True
    tracking_uri: str | None = None
    cache_dir: Path = Field(default_factory=default_cache_dir)
    disk_cache_bytes: int = Field(default=4 * 2**30, description="Bound of the artifact cache")
    max_batch_rows: int = Field(default=256, ge=1, description="Rows in one micro-batch")
    prefetch: bool = Field(
        default=True, description="Download artifacts at start (not into memory); readiness waits"
    )
    exit_if_unloadable: bool = Field(
        default=False,
        description="Exit with status 3 when a pinned model's files download but do not load, "
        "saying why in termination_log (a pod's status then shows it); otherwise that model is "
        "never ready and the server stays up",
    )
    termination_log: Path = Field(
        default=Path("/dev/termination-log"),
        description="Where --exit-if-unloadable writes why (Kubernetes' terminationMessagePath)",
    )
    max_request_bytes: int = Field(
        default=64 * 2**20, ge=1, description="Largest request body; larger ones get a 413"
    )
    max_request_rows: int = Field(
        default=100_000, ge=1, description="Most rows in one request; more get a 400 naming it"
    )
    mlflow_timeout: int = Field(
        default=10, ge=1, description="Seconds one MLflow HTTP call may take (each attempt)"
    )
    mlflow_retries: int = Field(default=2, ge=0, description="Retries of a failed MLflow call")
    shutdown_seconds: float = Field(
        default=20,
        gt=0,
        description="After SIGTERM, exit within this (the pod's 30 s grace less its preStop)",
    )
    access_log: bool = Field(
        default=False,
        description="Log a line per request (uvicorn's access log and KServe's timings); "
        "off by default: at hundreds of requests a second the lines cost more than a prediction",
    )
    predict_threads: int | None = Field(
        default=1, ge=1, description="OpenMP/BLAS/torch threads per predict; None: library default"
    )

    @field_validator("memory_budget", "disk_cache_bytes", "max_request_bytes", mode="before")
    @classmethod
    def _quantity(cls, value: str | int | None) -> int | None:
        return None if value is None else parse_quantity(value)

    @model_validator(mode="after")
    def _one_mode(self) -> ServerSettings:
        modes = [bool(self.model_uri), self.multi_model, bool(self.models)]
        if sum(modes) > 1:
            raise ValueError("give only one of --model-uri, --multi-model, --serve-model")
        if not any(modes):
            raise ValueError("model_uri: required unless --multi-model or --serve-model is given")
        for name in self.models:
            if not _MODEL_NAME.match(name):
                raise ValueError(f"models: {name!r} is not a model name")
        if self.model_name is None and self.model_uri:
            self.model_name = name_from_uri(self.model_uri)
        return self


def name_from_uri(uri: str) -> str:
    """The registered model name in `models:/name/1` or `models:/name@alias`, else "model"."""
    if uri.startswith("models:/"):
        rest = uri.removeprefix("models:/")
        return re.split(r"[/@]", rest, maxsplit=1)[0] or "model"
    return "model"
