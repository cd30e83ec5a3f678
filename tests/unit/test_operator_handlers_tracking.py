"""Finding 1 end to end through the kopf handlers: a TrainingRun or ModelDeployment whose
spec.mlflow.trackingUri names a host the admin did not allow fails with a fixed reason,
and the operator makes no request to that host (nor to the API server: none is needed).

kopf's own event machinery collects the Events the handlers post (the `events` fixture,
tests/unit/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf
import pytest

from mlkube.operator import handlers
from tests.fixtures.http_server import Server, answer


@pytest.fixture(autouse=True)
def no_host_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator as installed allows no extra host. (The e2e modules allow loopback in
    this process's environment for their in-process operators; handlers read it at import.)"""
    monkeypatch.setattr(
        handlers, "SETTINGS", handlers.SETTINGS.model_copy(update={"mlflow_allowed_hosts": []})
    )


def body(kind: str, spec: dict[str, Any]) -> kopf.Body:
    return kopf.Body({
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "team-b", "uid": "u-1", "generation": 1},
        "spec": spec,
        "status": {},
    })  # fmt: skip


def attacker_uri(server: Server) -> str:
    return f"{server.uri}/steal"


def test_a_trainingrun_naming_a_foreign_host_fails_and_nothing_calls_it(
    serve: Callable[..., Server], events: Callable[[], list[Any]]
) -> None:
    attacker = serve(lambda request: answer(200, {}))
    run = body("TrainingRun", {"task": "insurance", "model": {"name": "m"},
                               "mlflow": {"trackingUri": attacker_uri(attacker)}})  # fmt: skip
    patch = kopf.Patch()
    handlers.create_rayjob(body=run, meta=run.metadata, patch=patch)
    status = patch["status"]
    assert status["phase"] == "Failed"
    [succeeded] = status["conditions"]
    assert (succeeded["type"], succeeded["status"], succeeded["reason"]) == (
        "Succeeded", "False", "TrackingUriNotAllowed",
    )  # fmt: skip
    assert succeeded["message"].startswith("spec.mlflow.trackingUri: host '127.0.0.1'")
    assert "rayJobName" not in status
    [event] = events()
    assert (event.type, event.reason) == ("Warning", "TrackingUriNotAllowed")
    assert attacker.seen == []


@pytest.mark.parametrize("model", [{"name": "m", "alias": "champion"}, {"name": "m", "version": 3}])
def test_a_modeldeployment_naming_a_foreign_host_fails_and_nothing_calls_it(
    serve: Callable[..., Server], events: Callable[[], list[Any]], model: dict[str, Any]
) -> None:
    attacker = serve(lambda request: answer(200, {"model_version": {"version": "1"}}))
    deployment = body(
        "ModelDeployment", {"model": model, "mlflow": {"trackingUri": attacker_uri(attacker)}}
    )
    patch = kopf.Patch()
    handlers.deployment_changed(
        body=deployment, meta=deployment.metadata, patch=patch, memo=kopf.Memo()
    )
    status = patch["status"]
    assert status["phase"] == "Failed"
    reasons = {c["type"]: c["reason"] for c in status["conditions"]}
    assert reasons == {"ModelResolved": "TrackingUriNotAllowed", "Ready": "TrackingUriNotAllowed"}
    assert "servedVersion" not in status and "inferenceServiceName" not in status
    assert [(e.type, e.reason) for e in events()] == [("Warning", "TrackingUriNotAllowed")]
    assert attacker.seen == []
