"""An MLflow model URI -> the immutable thing to download (a pinned version, a run path).

Aliases are resolved here, once per load: the loaded model remembers which version it is,
and the disk cache is keyed by that version, so a moved alias never serves stale files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlkube.api.registered_model import model_uri

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")
_RUNS = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+)$")


class UnknownModel(LookupError):
    """The URI names a registered model, version or alias that does not exist (a 404)."""


@dataclass(frozen=True)
class ModelSource:
    """A concrete, immutable model location."""

    uri: str  # what to download: models:/name/3, runs:/id/path, s3://..., or a local path
    key: str  # disk cache key, stable for the same content
    name: str
    version: str | None = None
    local_path: Path | None = None  # set when no download is needed

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}" if self.version else self.name


@dataclass(frozen=True)
class ParsedUri:
    kind: str  # "version" | "alias" | "run" | "local" | "other"
    name: str
    ref: str | None = None


def parse_uri(uri: str) -> ParsedUri:
    """Pure parsing; no MLflow call. Raises ValueError naming the problem."""
    if uri.startswith("models:/"):
        match = _MODELS.match(uri)
        if not match:
            raise ValueError(
                f"model URI {uri!r}: expected models:/name/version or models:/name@alias"
            )
        if match.group("alias"):
            return ParsedUri("alias", match.group("name"), match.group("alias"))
        version = match.group("version")
        if not version.isdigit():
            raise ValueError(f"model URI {uri!r}: version must be a number (or use @alias)")
        return ParsedUri("version", match.group("name"), version)
    if uri.startswith("runs:/"):
        match = _RUNS.match(uri)
        if not match:
            raise ValueError(f"model URI {uri!r}: expected runs:/<run_id>/<path>")
        return ParsedUri("run", match.group("path").strip("/").split("/")[-1], uri)
    if uri.startswith("file://") or "://" not in uri:
        return ParsedUri("local", Path(uri.removeprefix("file://")).name or "model", uri)
    return ParsedUri("other", uri.rstrip("/").rsplit("/", 1)[-1] or "model", uri)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve(uri: str, client: Any | None = None) -> ModelSource:
    """Pin `uri` to a version through the MLflow registry (blocking; call from a thread)."""
    parsed = parse_uri(uri)
    if parsed.kind == "local":
        path = Path(uri.removeprefix("file://"))
        return ModelSource(uri, f"local-{_digest(str(path.resolve()))}", parsed.name, None, path)
    if parsed.kind == "run":
        return ModelSource(uri, f"runs-{_digest(uri)}", parsed.name)
    if parsed.kind == "other":
        return ModelSource(uri, f"uri-{_digest(uri)}", parsed.name)

    from mlflow.exceptions import MlflowException

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    try:
        if parsed.kind == "alias":
            model_version = client.get_model_version_by_alias(parsed.name, str(parsed.ref))
        else:
            model_version = client.get_model_version(parsed.name, str(parsed.ref))
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            what = f"alias {parsed.ref!r}" if parsed.kind == "alias" else f"version {parsed.ref}"
            raise UnknownModel(f"model {parsed.name!r} has no {what} in the registry") from None
        raise
    version = str(model_version.version)
    key = f"models-{_safe(parsed.name)}-v{version}-{_digest(parsed.name)}"
    return ModelSource(model_uri(parsed.name, version=version), key, parsed.name, version)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64]


def registered_owner(name: str, client: Any | None = None) -> str | None:
    """The owner namespace tag of registered model `name` (UnknownModel if not registered)."""
    from mlflow.exceptions import MlflowException

    from mlkube.training.ownership import TAG_OWNER

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UnknownModel(f"model {name!r} is not in the registry") from None
        raise
    owner = (model.tags or {}).get(TAG_OWNER)
    return str(owner) if owner is not None else None


def owned_by(
    namespace: str,
    resolver: Callable[[str], ModelSource] = resolve,
    owner_of: Callable[[str], str | None] = registered_owner,
) -> Callable[[str], ModelSource]:
    """`resolver` for a server that serves one namespace: a registered model whose owner
    tag names another namespace (or none) is unknown, with the same answer as a name the
    registry lacks, so that a tenant learns nothing of another's models. Anything but a
    registry URI is unknown too (a tenant names models, never paths)."""

    def resolve_owned(uri: str) -> ModelSource:
        parsed = parse_uri(uri)
        if parsed.kind not in ("version", "alias"):
            raise UnknownModel(f"{uri!r} is not a registered model")
        if owner_of(parsed.name) != namespace:
            raise UnknownModel(f"model {parsed.name!r} is not in the registry")
        return resolver(uri)

    return resolve_owned
