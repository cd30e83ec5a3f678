"""Reading custom resources from YAML with one-line errors that name the file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, overload

import yaml
from pydantic import ValidationError

from mlkube.api.common import API_VERSION
from mlkube.api.errors import UserError
from mlkube.api.modeldeployment import ModelDeployment
from mlkube.api.trainingrun import TrainingRun

KINDS: dict[str, type[TrainingRun] | type[ModelDeployment]] = {
    "TrainingRun": TrainingRun,
    "ModelDeployment": ModelDeployment,
}


class ManifestError(UserError):
    """A custom resource that cannot be used; the message is one line for the user."""


def format_validation_error(error: ValidationError, whole: str = "") -> str:
    """The first problem as `field.path: message`, plus how many more there are; a problem
    of the whole object (no field) is named `whole`."""
    problems = error.errors()
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where or whole}: {message}{more}"


@overload
def parse_resource(document: Any, source: str, expected: type[TrainingRun]) -> TrainingRun: ...
@overload
def parse_resource(
    document: Any, source: str, expected: type[ModelDeployment]
) -> ModelDeployment: ...
@overload
def parse_resource(
    document: Any, source: str = "<input>", expected: None = None
) -> TrainingRun | ModelDeployment: ...
def parse_resource(
    document: Any,
    source: str = "<input>",
    expected: type[TrainingRun] | type[ModelDeployment] | None = None,
) -> TrainingRun | ModelDeployment:
    if not isinstance(document, dict):
        raise ManifestError(f"{source}: expected a Kubernetes object (a YAML mapping)")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if api_version != API_VERSION:
        raise ManifestError(f"{source}: apiVersion must be {API_VERSION}, got {api_version!r}")
    model = KINDS.get(str(kind))
    if model is None:
        raise ManifestError(f"{source}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if expected is not None and model is not expected:
        raise ManifestError(f"{source}: kind must be {expected.__name__}, got {kind}")
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise ManifestError(f"{source}: {format_validation_error(error)}") from None


def read_documents(path: str | Path) -> list[Any]:
    source = Path(path)
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{source}: no such file") from None
    except OSError as error:
        raise ManifestError(f"{source}: {error.strerror}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise ManifestError(f"{source}: malformed YAML{line}: {problem}") from None
    if not documents:
        raise ManifestError(f"{source}: no Kubernetes object in the file")
    return documents


@overload
def load_manifest(path: str | Path, expected: type[TrainingRun]) -> TrainingRun: ...
@overload
def load_manifest(path: str | Path, expected: type[ModelDeployment]) -> ModelDeployment: ...
def load_manifest(
    path: str | Path, expected: type[TrainingRun] | type[ModelDeployment]
) -> TrainingRun | ModelDeployment:
    """The one object of kind `expected` in a YAML file."""
    documents = read_documents(path)
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected one object, found {len(documents)}")
    return parse_resource(documents[0], str(path), expected)
