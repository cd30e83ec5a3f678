"""The chart's files, without Helm: CRDs in step with crds/, the dashboard's metric names
real, values.yaml valid against values.schema.json, every env var one the operator reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "mlkube"


def test_chart_crds_are_the_repo_crds() -> None:
    repo = {p.name: p.read_bytes() for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert repo, "crds/ is empty"
    assert chart.keys() == repo.keys(), "charts/mlkube/crds/ holds other files than crds/"
    drifted = [name for name in repo if chart[name] != repo[name]]
    assert not drifted, f"copy crds/ to charts/mlkube/crds/ again: {drifted} differ"


def _exposed_names(registry: CollectorRegistry) -> set[str]:
    """The series names Prometheus scrapes (counters get _total, histograms _bucket...)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def _known_metrics() -> set[str]:
    from prometheus_client import REGISTRY

    import mlkube.operator.metrics  # noqa: F401  (registers the operator's metrics)
    from mlkube.model_servers.metrics import ServerMetrics

    server = CollectorRegistry()
    ServerMetrics(server)
    operator = {n for n in _exposed_names(REGISTRY) if n.startswith("mlkube_operator_")}
    # KServe's request histograms (kserve/metrics.py), label model_name.
    kserve = {
        f"request_{stage}_seconds_{suffix}"
        for stage in ("preprocess", "predict", "postprocess", "explain")
        for suffix in ("bucket", "sum", "count")
    }
    return operator | _exposed_names(server) | kserve


def _dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "mlkube.json").read_text())


def _expressions() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_that_exist() -> None:
    known = _known_metrics()
    used: set[str] = set()
    for expr in _expressions():
        used.update(re.findall(r"\b((?:mlkube|request)_[a-z_]+)\b", expr))
    unknown = used - known
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"


@pytest.mark.parametrize(
    "metric",
    [
        "mlkube_operator_reconciles_total",
        "mlkube_operator_phase_transitions_total",
        "mlkube_model_loads_total",
        "mlkube_model_cache_hits_total",
        "mlkube_model_cache_evictions_total",
        "request_predict_seconds_bucket",
    ],
)
def test_dashboard_shows(metric: str) -> None:
    """Reconciles, TrainingRun phases, model loads, cache hits and evictions, latency."""
    assert any(metric in expr for expr in _expressions())


def test_dashboard_panels_have_unique_ids_and_a_datasource_variable() -> None:
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_default_values_meet_the_schema() -> None:
    jsonschema.Draft7Validator(_schema()).validate(_values())


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"replicas": -1}, ["replicas"]),
        ({"replicas": 2}, ["replicas"]),  # standalone kopf: one operator at a time
        ({"operator": {"aliasPollSeconds": "soon"}}, ["operator", "aliasPollSeconds"]),
        ({"operator": {"logFormat": "xml"}}, ["operator", "logFormat"]),
        ({"mlflow": {"backendStore": {"uri": "postgresql://u:p@db/mlflow"}}},
         ["mlflow", "backendStore"]),
        ({"mlflow": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}},
         ["mlflow", "env", 0, "name"]),
        ({"operator": {"mlflowTrackingUri": "https://me:pw@mlflow.example"}},
         ["operator", "mlflowTrackingUri"]),
        ({"operator": {"allowedServiceAccounts": ["team-a/Admin"]}},
         ["operator", "allowedServiceAccounts", 0]),
    ],
)  # fmt: skip
def test_schema_refuses(change: dict[str, Any], path: list[Any]) -> None:
    values = _values()
    for key, value in change.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    errors = list(jsonschema.Draft7Validator(_schema()).iter_errors(values))
    assert [list(e.absolute_path) for e in errors] == [path], [e.message for e in errors]


def test_schema_forbids_unknown_keys_at_every_level() -> None:
    def walk(node: dict[str, Any], where: str) -> list[str]:
        missing = []
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                missing.append(where or "<root>")
            for key, child in node["properties"].items():
                missing += walk(child, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            missing += walk(node["items"], f"{where}[]")
        return missing

    assert walk(_schema(), "") == []


def test_every_operator_env_var_in_the_chart_is_a_setting() -> None:
    from mlkube.operator.settings import OperatorSettings

    template = (CHART / "templates" / "deployment.yaml").read_text()
    used = set(re.findall(r"name: (MLKUBE_OPERATOR_[A-Z_]+)", template))
    fields = {f"MLKUBE_OPERATOR_{name.upper()}" for name in OperatorSettings.model_fields}
    assert used, "no MLKUBE_OPERATOR_* env in the Deployment"
    assert used <= fields, sorted(used - fields)
    # The ones the issue names: tracking URI, images, alias poll interval, namespaces.
    assert {
        "MLKUBE_OPERATOR_MLFLOW_TRACKING_URI",
        "MLKUBE_OPERATOR_PREDICTOR_IMAGE",
        "MLKUBE_OPERATOR_ALIAS_POLL_SECONDS",
        "MLKUBE_OPERATOR_NAMESPACES",
    } <= used
