"""The retrain flow (docs/flows.md) on the real node: the real Prefect flow runs here, on the
host, as a worker would; it ingests replayed hours into a Parquet dataset on the lane's
S3-compatible store, applies a TrainingRun through the node's API server, and waits. The
lane's chart release turns it into a RayJob for the real KubeRay; the train flow reads the
dataset in the Ray head pod with the namespace's keys (Secret + ConfigMap through envFrom)
and logs to the chart's MLflow; the flow returns what the operator wrote to the status.
A second day trains again; a run with nothing new skips.

The runtime image the suite builds has no torch, so the template trains the scikit-learn
`tabular` task on the same table (target `temp`) rather than atmos-temperature's GRU: the
flow does not depend on the task."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from mlkube.flows.ingest import DatasetSettings, read_dataset, read_ledger
from mlkube.flows.retrain import ANNOTATION_DATA_THROUGH, LABEL_FLOW_RUN_ID, retrain
from mlkube.flows.retrain_models import RetrainConfig, RetrainFailed, RetrainOutcome
from tests.cluster.node import Node
from tests.cluster.objectstore import ObjectStore
from tests.node.steps import s3_env_from


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A Prefect API for this module, stopped cleanly (a temporary server started by the
    first flow would be stopped at interpreter exit, after pytest closed its output)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def template(model: str, env_from: list[dict[str, Any]]) -> dict[str, Any]:
    """One trial of 50 boosting rounds, no worker pods, a head sized for the two-core node;
    on the namespace's warm Ray cluster, as a scheduled retrain would."""
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "temp-retrain"},
        "spec": {
            "task": "tabular",
            "dataset": {"target": "temp", "problem": "regression"},
            "model": {"name": model},
            "tuning": {"numTrials": 1, "maxConcurrentTrials": 1,
                       "searchSpace": {"max_iter": {"choice": [50]}}},
            "ray": {"workers": 0, "head": {"cpu": "800m", "memory": "3Gi"},
                    "cluster": {"warm": True}, "envFrom": env_from,
                    "env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}]},
            "ttlSecondsAfterFinished": 0,
        },
    }  # fmt: skip


def trainingruns(node: Node, namespace: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(
        node.kubectl("get", "tr", "-n", namespace, "-o", "json").stdout
    )["items"]
    return sorted(found, key=lambda tr: tr["metadata"]["creationTimestamp"])


def run_flow(node: Node, namespace: str, config: RetrainConfig) -> RetrainOutcome:
    """The flow's outcome; a failed training fails the test with the TrainingRuns' status."""
    try:
        return retrain(config)
    except RetrainFailed as error:
        status = [tr.get("status") for tr in trainingruns(node, namespace)]
        pytest.fail(f"{error}\n{json.dumps(status, indent=1)}", pytrace=False)


@pytest.mark.usefixtures("prefect_api", "release")
def test_retrain_flow_trains_on_the_node_twice_then_skips(
    node: Node,
    namespace: str,
    object_store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker's side: the node's API server and the store's keys, from its environment.
    monkeypatch.setenv("KUBECONFIG", str(node.kubeconfig))
    for key, value in object_store.env().items():
        monkeypatch.setenv(key, value)
    object_store.bucket("datasets")
    uri = f"s3://datasets/{namespace}/temperatures.parquet"
    model = f"temp-{namespace.rsplit('-', 1)[-1]}"
    env_from = s3_env_from(node, namespace, object_store)
    config = RetrainConfig.model_validate({
        # 45 days into the empty dataset, then one more day per run, then nothing.
        "source": {"kind": "replay", "initialDays": 45, "end": "2010-02-15"},
        "dataset": {"uri": uri},
        "trainingrun": template(model, env_from),
        "cluster": {"namespace": namespace, "timeoutSeconds": 1200, "pollSeconds": 2},
    })  # fmt: skip

    first = run_flow(node, namespace, config)
    assert first.ingest.rows_added == 45 * 24 and first.decision.train
    assert first.training is not None, first.decision
    (run,) = trainingruns(node, namespace)
    name = run["metadata"]["name"]
    assert first.training.phase == "Succeeded", first.training
    assert first.training.trainingrun == name and name.startswith("temp-retrain-")
    assert first.training.namespace == namespace
    assert (first.training.model_name, first.training.model_version) == (model, 1)
    assert first.training.promoted is True and first.training.promotion_reason
    assert first.training.metric == "mae" and first.training.best_value is not None
    assert run["metadata"]["labels"][LABEL_FLOW_RUN_ID] == first.flow_run_id
    assert run["metadata"]["annotations"][ANNOTATION_DATA_THROUGH] == "2010-02-14T23:00:00"
    assert run["spec"]["dataset"]["uri"] == uri and run["spec"]["ray"]["envFrom"] == env_from

    second = run_flow(node, namespace, config)
    assert second.ingest.rows_added == 24
    assert f"{second.ingest.first_added:%Y-%m-%d %H}" == "2010-02-15 00"
    assert second.training is not None and second.training.phase == "Succeeded", second
    assert second.training.model_version == 2
    # Promoted or not, as the gate decided on the held-out rows; the status says which and why.
    assert second.training.promoted is not None and second.training.promotion_reason
    runs = trainingruns(node, namespace)
    assert [tr["metadata"]["name"] for tr in runs][0] == name and len(runs) == 2
    assert runs[1]["metadata"]["labels"][LABEL_FLOW_RUN_ID] == second.flow_run_id
    assert runs[1]["metadata"]["annotations"][ANNOTATION_DATA_THROUGH] == "2010-02-15T23:00:00"
    assert runs[1]["status"]["promoted"] == second.training.promoted

    last = run_flow(node, namespace, config)
    assert last.training is None and last.ingest.rows_added == 0
    assert last.decision.reason == "no new data: the source has no hours after 2010-02-15 23:00"
    assert len(trainingruns(node, namespace)) == 2

    # What the store holds: every hour once, and the ledger of the two runs that added some.
    dataset = DatasetSettings(uri=uri)
    assert len(read_dataset(dataset)) == 46 * 24
    ledger = read_ledger(dataset)
    assert [(e["rows_added"], e["flow_run_id"]) for e in ledger] == [
        (45 * 24, first.flow_run_id),
        (24, second.flow_run_id),
    ]
