"""Finding 5: a registered model belongs to the namespace that first registered it. Another
namespace's TrainingRun cannot register or promote versions of it, and its ModelDeployment
cannot serve it; the refusal names the owner. Against the real MLflow server."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import pytest
from mlflow import MlflowClient

from mlkube.api import TrainingRun
from mlkube.operator import handlers, mlflow_reader
from mlkube.operator.rollout import DeploymentMemo, check_ownership
from mlkube.operator.tracking import tracking_target
from mlkube.training import registry
from mlkube.training.ownership import NOT_OWNER, TAG_OWNER, ModelNotOwned
from tests.fixtures.mlflow_server import MlflowServer, process_wide_uris

pytestmark = pytest.mark.integration


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.tracking_uri)


def owned_model(client: MlflowClient, owner: str | None) -> str:
    """A registered model with a champion version, owned by `owner` (None: no owner tag)."""
    name = f"owned-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    run = client.create_run(experiment)
    client.create_registered_model(name, tags={TAG_OWNER: owner} if owner else None)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    return name


# --------------------------------------------------------------------------- the train flow


def test_the_first_namespace_to_register_owns_the_model_and_others_are_refused(
    client: MlflowClient,
) -> None:
    name = f"claim-{uuid.uuid4().hex[:8]}"
    registry.claim(client, name, "team-a", shared=False)
    assert client.get_registered_model(name).tags[TAG_OWNER] == "team-a"
    registry.claim(client, name, "team-a", shared=False)  # the owner again: fine
    with pytest.raises(ModelNotOwned) as refused:
        registry.claim(client, name, "team-b", shared=False)
    assert str(refused.value) == (
        f"spec.model.name: registered model '{name}' belongs to namespace 'team-a', not "
        "'team-b' (operator.allowSharedModels is off)"
    )
    assert client.get_registered_model(name).tags[TAG_OWNER] == "team-a"
    registry.claim(client, name, "team-b", shared=True)  # the admin allows sharing
    assert client.get_registered_model(name).tags[TAG_OWNER] == "team-a"


def test_two_namespaces_claiming_at_once_get_one_owner(client: MlflowClient) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    start = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def claim(namespace: str) -> None:
        start.wait()
        try:
            registry.claim(client, name, namespace, shared=False)
            outcomes[namespace] = "owner"
        except ModelNotOwned:
            outcomes[namespace] = "refused"

    threads = [threading.Thread(target=claim, args=(ns,)) for ns in ("team-a", "team-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owner = client.get_registered_model(name).tags[TAG_OWNER]
    assert outcomes[owner] == "owner"
    assert sorted(outcomes.values()) == ["owner", "refused"]


def test_a_model_registered_before_owners_existed_goes_to_the_first_namespace(
    client: MlflowClient,
) -> None:
    name = owned_model(client, None)
    registry.claim(client, name, "team-c", shared=False)
    assert client.get_registered_model(name).tags[TAG_OWNER] == "team-c"
    with pytest.raises(ModelNotOwned, match="belongs to namespace 'team-c'"):
        registry.check_owner(client, name, "team-a", shared=False)


@pytest.mark.usefixtures("ray_local", "prefect_api")
def test_another_namespaces_trainingrun_cannot_touch_the_model(
    mlflow_server: MlflowServer, client: MlflowClient, tmp_path: Any
) -> None:
    """The attack: a TrainingRun in team-b trains team-a's model to move its champion. It is
    refused before any search, with one line naming team-a; no run, no version, and the
    champion stays."""
    from mlkube.flows.train import train
    from tests.conftest import SHARED

    name = owned_model(client, "team-a")
    run = TrainingRun.model_validate({
        "metadata": {"name": "steal", "namespace": "team-b", "uid": str(uuid.uuid4())},
        "spec": {
            "task": "insurance", "model": {"name": name},
            "dataset": {"uri": str(SHARED / "data" / "insurance.csv")},
            "tuning": {"numTrials": 1}, "mlflow": {"trackingUri": mlflow_server.tracking_uri},
        },
    })  # fmt: skip
    with pytest.raises(ModelNotOwned) as refused, process_wide_uris():
        train(run, show_progress=False)
    assert "belongs to namespace 'team-a', not 'team-b'" in str(refused.value)
    assert "\n" not in str(refused.value)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    experiment = client.get_experiment_by_name(name)
    assert not client.search_runs([experiment.experiment_id], "tags.`mlkube.trainingrun.name` = "
                                                              "'steal'")  # fmt: skip


# --------------------------------------------------------------------------- the operator


@pytest.fixture
def allowed(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        handlers, "SETTINGS",
        handlers.SETTINGS.model_copy(update={"mlflow_allowed_hosts": ["127.0.0.1"],
                                             "allow_shared_models": False}),
    )  # fmt: skip
    target = tracking_target(mlflow_server.tracking_uri, "http://mlflow:5000", ["127.0.0.1"])
    mlflow_reader._readers.pop((target.uri, target.credentials), None)


def deployment_body(namespace: str, model: dict[str, Any], uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "serve", "namespace": namespace, "uid": "u-1", "generation": 1},
        "spec": {"model": model, "mlflow": {"trackingUri": uri}},
        "status": {},
    }


@pytest.mark.usefixtures("allowed")
@pytest.mark.parametrize("selector", [{"alias": "champion"}, {"version": 1}])
def test_a_modeldeployment_of_another_namespaces_model_is_refused_naming_the_owner(
    mlflow_server: MlflowServer, client: MlflowClient, selector: dict[str, Any]
) -> None:
    """No InferenceService: the refusal comes before the operator reads or writes any
    (there is no API server here; a read would fail the test)."""
    name = owned_model(client, "team-a")
    body = deployment_body("team-b", {"name": name, **selector}, mlflow_server.tracking_uri)
    update = handlers.reconcile_deployment(body, DeploymentMemo(), force_resolve=True)
    status = update.status
    assert status["phase"] == "Failed" and "inferenceServiceName" not in status
    reasons = {c["type"]: c["reason"] for c in status["conditions"]}
    assert reasons == {"ModelResolved": NOT_OWNER, "Ready": NOT_OWNER}
    assert status["message"] == (
        f"spec.model.name: registered model '{name}' belongs to namespace 'team-a', not "
        "'team-b' (operator.allowSharedModels is off)"
    )
    assert [(e.type, e.reason) for e in update.events] == [("Warning", NOT_OWNER)]


@pytest.mark.usefixtures("allowed")
def test_a_model_without_an_owner_is_not_served(
    mlflow_server: MlflowServer, client: MlflowClient
) -> None:
    name = owned_model(client, None)
    body = deployment_body("team-b", {"name": name}, mlflow_server.tracking_uri)
    status = handlers.reconcile_deployment(body, DeploymentMemo(), force_resolve=True).status
    assert "has no owner namespace" in status["message"]


@pytest.mark.usefixtures("allowed")
def test_the_owner_and_shared_mode_pass_the_ownership_check(
    mlflow_server: MlflowServer, client: MlflowClient
) -> None:
    name = owned_model(client, "team-a")
    target = tracking_target(mlflow_server.tracking_uri, "http://mlflow:5000", ["127.0.0.1"])
    reader = mlflow_reader.reader_for(target)

    def check(namespace: str, *, shared: bool = False) -> tuple[str | None, bool]:
        refusal, known, _ = check_ownership(
            name, namespace, reader, DeploymentMemo(), [], now=dt.datetime.now(dt.UTC),
            poll_seconds=30, shared=shared, force=True,
        )  # fmt: skip
        return refusal, known

    assert check("team-a") == (None, True)
    refusal, known = check("team-b")
    assert refusal is not None and known
    assert check("team-b", shared=True) == (None, True)
