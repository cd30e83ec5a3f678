"""CustomResourceDefinitions generated from the pydantic models, so the two never drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mlkube.api.common import GROUP, VERSION
from mlkube.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from mlkube.api.trainingrun import TrainingRunSpec, TrainingRunStatus

# Keywords a Kubernetes structural schema accepts (JSONSchemaProps); the rest is dropped.
_KEPT_KEYWORDS = {
    "type", "description", "properties", "required", "items", "additionalProperties",
    "enum", "default", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "minProperties", "maxProperties", "format", "nullable",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}  # fmt: skip


def _inline(schema: Any, definitions: dict[str, Any], keep_defaults: bool) -> Any:
    """Resolve $refs and rewrite pydantic's JSON schema into a structural OpenAPI v3 one."""
    if isinstance(schema, list):
        return [_inline(item, definitions, keep_defaults) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _inline(merged, definitions, keep_defaults)
    if "anyOf" in schema:
        # Optional[X] is anyOf [X, null]: optional fields are simply not required.
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        if len(options) == 1:
            return _inline({**options[0], **rest}, definitions, keep_defaults)
        return {"x-kubernetes-preserve-unknown-fields": True, **_describe(rest)}
    if "const" in schema:
        schema = {**schema, "enum": [schema["const"]]}
    if not schema.get("type") and "properties" not in schema and "enum" not in schema:
        # Any value (e.g. the entries of a `choice` list).
        return {"x-kubernetes-preserve-unknown-fields": True, **_describe(schema)}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in _KEPT_KEYWORDS:
            continue
        if key == "default" and (not keep_defaults or value is None or value == {}):
            continue
        if key == "additionalProperties" and value is False:
            continue  # unknown fields are pruned, and refused under strict field validation
        if key == "properties":
            out[key] = {n: _inline(p, definitions, keep_defaults) for n, p in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _inline(value, definitions, keep_defaults)
        else:
            out[key] = value
    if "properties" in schema and "type" not in out:
        out["type"] = "object"
    return out


def _describe(schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": schema["description"]} if "description" in schema else {}


def openapi_schema(model: type[BaseModel], keep_defaults: bool = True) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}), keep_defaults)
    return schema


def _crd(
    kind: str,
    plural: str,
    short_name: str,
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["mlkube"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": openapi_schema(status, keep_defaults=False),
                            },
                        }
                    },
                }
            ],
        },
    }


def _column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, **extra}


AGE = _column("Age", ".metadata.creationTimestamp", "date")


def generate_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object."""
    trainingruns = _crd(
        "TrainingRun",
        "trainingruns",
        "tr",
        TrainingRunSpec,
        TrainingRunStatus,
        [
            _column("Phase", ".status.phase"),
            _column("Task", ".spec.task"),
            _column("Trials", ".status.trials.completed", "integer"),
            _column("Best", ".status.best.value", "number"),
            _column("Version", ".status.modelVersion", "integer"),
            _column("Promoted", ".status.promoted", "boolean"),
            AGE,
        ],
    )
    modeldeployments = _crd(
        "ModelDeployment",
        "modeldeployments",
        "md",
        ModelDeploymentSpec,
        ModelDeploymentStatus,
        [
            _column("Model", ".spec.model.name"),
            _column("Alias", ".spec.model.alias"),
            _column("Models", ".status.modelsReady"),
            _column("Version", ".status.servedVersion", "integer"),
            _column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            _column("URL", ".status.url"),
            _column("Protocol", ".spec.protocol", priority=1),
            _column("Predict", ".status.predictUrl", priority=1),
            AGE,
        ],
    )
    return {
        f"{GROUP}_trainingruns.yaml": trainingruns,
        f"{GROUP}_modeldeployments.yaml": modeldeployments,
    }


def render_crds() -> dict[str, str]:
    header = "# Generated by `mlkube crds` from mlkube/api; do not edit.\n"
    return {
        name: header + yaml.safe_dump(crd, sort_keys=False, width=100)
        for name, crd in generate_crds().items()
    }


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
