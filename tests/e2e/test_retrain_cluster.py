"""The retrain flow against the real control plane: it applies a TrainingRun, the operator
turns it into a RayJob, the RayJob player runs the real train flow (tiny budget), and the
flow returns the outcome the operator wrote to the TrainingRun's status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from mlkube.flows.ingest import DatasetSettings, commit, plan_ingest
from mlkube.flows.retrain import LABEL_FLOW_RUN_ID, retrain
from mlkube.flows.retrain_models import RetrainConfig
from tests.cluster.players import RayJobPlayer
from tests.e2e.operator_support import running_operator


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A Prefect API for this module, stopped cleanly (a temporary server started by the
    first flow would be stopped at interpreter exit, after pytest closed its output)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.usefixtures("prefect_api")
def test_retrain_flow_creates_a_trainingrun_and_returns_its_outcome(
    kube_api: client.ApiClient,
    namespace: str,
    rayjob_player: RayJobPlayer,
    mlflow_server: Any,
    operator_env: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    dataset = tmp_path / "atmos.parquet"
    model = f"atmos-{namespace}"[:60]
    config = RetrainConfig.model_validate({
        "source": {"kind": "replay", "initialDays": 45, "end": "2010-02-15"},
        "dataset": {"uri": str(dataset)},
        "trainingrun": {
            "apiVersion": "mlkube.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "atmos-retrain"},
            "spec": {
                "task": "atmos-temperature",
                "model": {"name": model},
                "tuning": {"numTrials": 1, "maxConcurrentTrials": 1, "searchSpace": {
                    "epochs": {"choice": [1]}, "hidden": {"choice": [16]}}},
                "ray": {"workers": 0},
                "mlflow": {"trackingUri": mlflow_server.tracking_uri},
                "ttlSecondsAfterFinished": 0,
            },
        },
        "cluster": {"namespace": namespace, "timeoutSeconds": 420, "pollSeconds": 0.5},
    })  # fmt: skip
    commit(plan_ingest(config.dataset, config.source), config.dataset)  # 45 days held

    with running_operator(namespace):
        outcome = retrain(config)

    training = outcome.training
    assert training is not None and outcome.ingest.rows_added == 24
    (found,) = client.CustomObjectsApi(kube_api).list_namespaced_custom_object(
        "mlkube.io", "v1alpha1", namespace, "trainingruns"
    )["items"]
    name = found["metadata"]["name"]
    assert training.phase == "Succeeded", (training, rayjob_player.logs(name)[1][-3000:])
    assert training.trainingrun == name and name.startswith("atmos-retrain-")
    assert training.model_version == 1 and training.promoted is True
    assert training.promotion_reason and training.metric == "mae" and training.best_value
    assert found["metadata"]["labels"][LABEL_FLOW_RUN_ID] == outcome.flow_run_id
    assert found["spec"]["dataset"]["uri"] == str(dataset)
    assert found["metadata"]["annotations"]["mlkube.io/dataset-through"] == "2010-02-15T23:00:00"
    assert DatasetSettings(uri=str(dataset)).uri == str(dataset)
