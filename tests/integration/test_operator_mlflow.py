"""The operator's MLflow reads against the real MLflow server (3.x), where the unit
tests' stand-ins could hide a difference: a missing alias of an existing model is HTTP
400 INVALID_PARAMETER_VALUE there, not 404 (issue 13, finding 2).

What is asserted is what users see: the ModelDeployment's conditions, the TrainingRun's
status, as the handlers' own functions compute them."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from mlkube.api.modeldeployment import ModelDeployment
from mlkube.api.trainingrun import TrainingRunStatus
from mlkube.operator import mlflow_reader
from mlkube.operator.conditions import MLFLOW_REACHABLE, find_condition
from mlkube.operator.rollout import MODEL_RESOLVED, DeploymentMemo, follow_model
from mlkube.operator.status import OUTCOME_READABLE, trainingrun_status
from mlkube.operator.tracking import TrackingTarget, tracking_target
from mlkube.training import outcome as tags
from tests.fixtures.mlflow_server import MlflowServer


@pytest.fixture
def client(mlflow_server: MlflowServer) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.tracking_uri)


@pytest.fixture
def target(mlflow_server: MlflowServer) -> Iterator[TrackingTarget]:
    """The real server as a spec names it (allowed host, no credentials); a fresh backoff."""
    found = tracking_target(mlflow_server.tracking_uri, "http://mlflow:5000", ["127.0.0.1"])
    assert found.credentials is False
    mlflow_reader._readers.pop((found.uri, found.credentials), None)
    yield found
    mlflow_reader._readers.pop((found.uri, found.credentials), None)


def registered(client: Any, alias: str = "champion") -> str:
    """A registered model with one version that `alias` points at."""
    name = f"model-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    run = client.create_run(experiment)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return name


def deployment(name: str, model: str, alias: str, uri: str) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"model": {"name": model, "alias": alias}, "mlflow": {"trackingUri": uri}},
    })  # fmt: skip


def resolve(md: ModelDeployment, target: TrackingTarget) -> tuple[int | None, dict[str, Any]]:
    """What the operator follows for `md`: the alias resolved through the real server (every
    namespace may serve every model here: ownership is test_model_ownership's)."""
    followed = follow_model(
        md, mlflow_reader.reader_for(target), DeploymentMemo(), [],
        now=dt.datetime.now(dt.UTC), poll_seconds=30, shared=True, force=True,
    )  # fmt: skip
    return followed.version, {c.type: c for c in followed.conditions}


def test_a_missing_alias_is_not_found_and_mlflow_stays_up_for_the_others(
    mlflow_server: MlflowServer, client: Any, target: TrackingTarget
) -> None:
    existing, other = registered(client), registered(client)
    # What the real server answers (the unit tests' stand-in said 404).
    query = urllib.parse.urlencode({"name": existing, "alias": "nope"})
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(f"{target.uri}/api/2.0/mlflow/registered-models/alias?{query}")
    assert answered.value.code == 400
    assert json.loads(answered.value.read())["error_code"] == "INVALID_PARAMETER_VALUE"
    lonely = deployment("lonely", existing, "nope", target.uri)
    version, conditions = resolve(lonely, target)
    assert version is None
    resolved = conditions[MODEL_RESOLVED]
    assert (resolved.status, resolved.reason) == ("False", "AliasNotFound")
    assert (conditions[MLFLOW_REACHABLE].status, conditions[MLFLOW_REACHABLE].reason) == (
        "True", "Reachable",
    )  # fmt: skip
    # A model that does not exist at all reads the same way.
    gone, conditions = resolve(deployment("gone", f"no-{existing}", "champion", target.uri), target)
    assert gone is None and conditions[MODEL_RESOLVED].reason == "AliasNotFound"
    # Right after, an unrelated deployment on the same MLflow resolves, and says nothing
    # about the other one's model.
    version, conditions = resolve(deployment("fine", other, "champion", target.uri), target)
    assert version == 1
    assert conditions[MODEL_RESOLVED].reason == "AliasResolved"
    assert all(existing not in c.message for c in conditions.values())
    assert mlflow_reader.reader_for(target).backoff.failures == 0


def parent(client: Any, experiment: str, uid: str, namespace: str, **more: str) -> str:
    run_tags = {tags.TAG_UID: uid, tags.TAG_NAMESPACE: namespace, tags.TAG_ROLE: "parent",
                tags.TAG_TRIALS_TOTAL: "2", tags.TAG_TRIALS_COMPLETED: "2", **more}  # fmt: skip
    run = client.create_run(experiment, tags=run_tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def test_the_outcome_is_read_only_from_runs_of_this_trainingrun(
    client: Any, target: TrackingTarget
) -> None:
    experiment = client.create_experiment(f"outcome-{uuid.uuid4().hex[:8]}")
    uid = str(uuid.uuid4())
    own = parent(client, experiment, uid, "team-a", **{tags.TAG_MODEL_VERSION: "2"})
    # Another tenant writes a run with the same uid, later, in its own namespace.
    impostor = parent(client, experiment, uid, "team-b", **{tags.TAG_MODEL_VERSION: "99"})
    reader = mlflow_reader.reader_for(target)

    found = reader.find_outcome(uid, "team-a")
    assert found is not None and (found.run_id, found.model_version) == (own, 2)
    # Even when the status names the impostor's run id, it is not taken.
    found = reader.find_outcome(uid, "team-a", impostor)
    assert found is not None and found.run_id == own
    # A run id MLflow does not know: the search finds the run (MLflow answers 404/400).
    found = reader.find_outcome(uid, "team-a", uuid.uuid4().hex)
    assert found is not None and found.run_id == own
    assert reader.find_outcome(uid, "team-c") is None
    assert reader.backoff.failures == 0


@pytest.mark.parametrize("value", ["abc", "[1,2]", "{"])
def test_outcome_tags_that_do_not_parse_are_a_condition(
    client: Any, target: TrackingTarget, value: str
) -> None:
    experiment = client.create_experiment(f"bad-tags-{uuid.uuid4().hex[:8]}")
    uid = str(uuid.uuid4())
    bad = {tags.TAG_BEST_VALUE: value, tags.TAG_BEST_PARAMS: value, tags.TAG_TRIALS_TOTAL: value,
           tags.TAG_MODEL_VERSION: value}  # fmt: skip
    run_id = parent(client, experiment, uid, "team-a", **bad)
    found = mlflow_reader.reader_for(target).find_outcome(uid, "team-a")
    assert found is not None and found.run_id == run_id
    status = trainingrun_status(
        TrainingRunStatus(phase="Running", ray_job_name="x"),
        rayjob_status={"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        rayjob_exists=True,
        outcome=found,
        mlflow_error=None,
        mlflow_checked=True,
        now=dt.datetime.now(dt.UTC),
        grace_seconds=30,
    )
    condition = find_condition(status.conditions, OUTCOME_READABLE)
    assert condition is not None and condition.reason == "UnreadableTags"
    for key in bad:
        assert key in condition.message
    assert status.phase == "Running" and status.mlflow_run_id == run_id
