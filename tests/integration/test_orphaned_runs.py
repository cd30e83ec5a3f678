"""A train flow whose driver died leaves its parent run RUNNING and maybe a version without
an alias; the next attempt of the same TrainingRun ends the run as KILLED and says on the
version why it has no alias. Against a real `mlflow server`."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from mlkube.flows.train import end_orphans
from mlkube.training import outcome
from tests.integration.conftest import trainingrun

pytestmark = pytest.mark.integration


def test_the_next_attempt_ends_a_dead_drivers_run_and_explains_its_version(
    mlflow_server: object, model_name: str
) -> None:
    client = MlflowClient(mlflow_server.tracking_uri)  # type: ignore[attr-defined]
    experiment = client.create_experiment(model_name)
    run = trainingrun("insurance", {"task": "insurance", "model": {"name": model_name}})
    run.metadata.uid = str(uuid.uuid4())
    run.metadata.namespace = "team-a"
    uid = run.metadata.uid

    # What a driver killed between registering and setting the alias leaves behind.
    parent = client.create_run(experiment, tags={outcome.TAG_UID: uid,
                                                 outcome.TAG_NAMESPACE: "team-a",
                                                 outcome.TAG_ROLE: "parent"})  # fmt: skip
    parent_id = parent.info.run_id
    trial = client.create_run(experiment, tags={outcome.TAG_PARENT_RUN: parent_id,
                                                outcome.TAG_ROLE: "trial"})  # fmt: skip
    client.log_text(parent_id, "x", "model/MLmodel")
    client.create_registered_model(model_name)
    orphan = client.create_model_version(
        model_name, f"{parent.info.artifact_uri}/model", parent_id, tags={outcome.TAG_UID: uid}
    )
    # A champion of another TrainingRun: not this attempt's business.
    other = client.create_model_version(
        model_name, f"{parent.info.artifact_uri}/model", parent_id, tags={outcome.TAG_UID: "x"}
    )
    client.set_registered_model_alias(model_name, "champion", other.version)

    end_orphans(client, experiment, run)

    ended = client.get_run(parent_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[outcome.TAG_ERROR].startswith(
        "KILLED: its train flow stopped without ending this run"
    )
    assert client.get_run(trial.info.run_id).info.status == "KILLED"
    found = outcome.outcome_from_tags(parent_id, ended.info.status, ended.data.tags)
    assert found.finished and found.error == ended.data.tags[outcome.TAG_ERROR]

    explained = client.get_model_version(model_name, orphan.version)
    assert explained.aliases == []
    assert explained.tags[outcome.TAG_NO_ALIAS_REASON] == (
        f"not promoted: the train flow of run {parent_id} stopped after registering this "
        "version and before setting its alias (driver killed or pod lost)"
    )
    champion = client.get_model_version(model_name, other.version)
    assert outcome.TAG_NO_ALIAS_REASON not in champion.tags

    # A second attempt finds nothing left to end.
    end_orphans(client, experiment, run)
    assert client.get_run(parent_id).data.tags == ended.data.tags
