"""The retrain loop on one machine: replay ingest -> checks -> local train flow -> report.

Real Ray, real MLflow store, real Prefect API; a tiny training budget.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from mlkube.cli import main as cli_main
from mlkube.flows.ingest import (
    DatasetSettings,
    commit,
    mark_decided,
    plan_ingest,
    read_dataset,
    read_ledger,
    read_ledger_document,
)
from mlkube.flows.retrain import retrain
from mlkube.flows.retrain_models import RetrainConfig, RetrainFailed
from mlkube.flows.retrain_report import artifact_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("ray_local", "prefect_api", "local_mlflow"),
]

TINY_TUNING = {
    "numTrials": 1,
    "maxConcurrentTrials": 1,
    "searchSpace": {"epochs": {"choice": [1]}, "hidden": {"choice": [16]}},
}


def template(model_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "atmos-retrain"},
        "spec": {"task": "atmos-temperature", "model": {"name": model_name}, "tuning": TINY_TUNING},
    }


def replay_config(dataset: Path, model_name: str) -> dict[str, Any]:
    # 45 days seeded (enough windows to train), then two more days, then the end.
    return {
        "source": {"kind": "replay", "initialDays": 45, "end": "2010-02-16"},
        "dataset": {"uri": str(dataset)},
        "trainingrun": template(model_name),
        "local": True,
    }


def markdown_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (latest,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return str(latest.data)


def test_two_replay_days_train_twice_then_nothing_new_skips(
    tmp_path: Path, model_name: str, local_mlflow: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = tmp_path / "atmos.parquet"
    config = RetrainConfig.model_validate(replay_config(dataset, model_name))
    seeded = commit(plan_ingest(config.dataset, config.source), config.dataset)
    assert seeded.rows_added == 45 * 24

    outcomes = [retrain(config) for _ in range(2)]
    for day, outcome in zip(("2010-02-15", "2010-02-16"), outcomes, strict=True):
        assert outcome.ingest.rows_added == 24
        assert f"{outcome.ingest.first_added:%Y-%m-%d %H}" == f"{day} 00"
        assert outcome.decision.train and outcome.training is not None
        assert outcome.training.phase == "Succeeded"
    assert [o.training.model_version for o in outcomes] == [1, 2]  # type: ignore[union-attr]
    assert outcomes[0].training.promoted is True  # type: ignore[union-attr]
    versions = local_mlflow.search_model_versions(f"name = '{model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len(read_dataset(DatasetSettings(uri=str(dataset)))) == 47 * 24
    ledger = read_ledger(DatasetSettings(uri=str(dataset)))
    assert [e["rows_added"] for e in ledger] == [1080, 24, 24]
    assert ledger[-1]["flow_run_id"] == outcomes[1].flow_run_id

    report = markdown_artifact(artifact_key(model_name))
    assert "version **2**" in report and "| 1104 | 24 | 24 | 2010-02-16 00:00 |" in report

    # The third run, from the command line: nothing new, so no training, and it says why.
    config_file = tmp_path / "retrain.yaml"
    config_file.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    capsys.readouterr()
    assert cli_main(["retrain", "-f", str(config_file), "--local"]) == 0
    said = capsys.readouterr().out
    assert said.strip() == (
        "0 new hours; training skipped: no new data: the source has no hours after 2010-02-16 23:00"
    )
    assert len(local_mlflow.search_model_versions(f"name = '{model_name}'")) == 2
    report = markdown_artifact(artifact_key(model_name))
    assert "**Training skipped**: no new data" in report


def test_drift_skips_training_unless_forced(tmp_path: Path, model_name: str) -> None:
    dataset = tmp_path / "atmos.parquet"
    document = replay_config(dataset, model_name)
    # A threshold no day can pass: every new day counts as drifted.
    document["checks"] = {"driftThreshold": 0.01}
    config = RetrainConfig.model_validate(document)
    commit(plan_ingest(config.dataset, config.source), config.dataset)

    skipped = retrain(config)
    assert skipped.ingest.rows_added == 24  # drifted data is kept; only training is skipped
    assert not skipped.trained and skipped.decision.reason.startswith("drift: KS ")
    assert "**Training skipped**: drift: KS" in markdown_artifact(artifact_key(model_name))


@pytest.fixture
def refusing_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """$KUBECONFIG -> a loopback API server that refuses every request (403), as one does
    for a flow whose service account may not create TrainingRuns; yields what it was asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def refuse(self) -> None:
            asked.append(f"{self.command} {self.path}")
            body = json.dumps({"kind": "Status", "status": "Failure", "reason": "Forbidden",
                               "code": 403}).encode()  # fmt: skip
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = refuse

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ml"}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield asked
    server.shutdown()
    server.server_close()


def test_rows_of_a_run_whose_trainingrun_was_not_submitted_are_trained_next_time(
    tmp_path: Path, model_name: str, refusing_kubeconfig: list[str]
) -> None:
    dataset = tmp_path / "atmos.parquet"
    document = replay_config(dataset, model_name)
    document["source"]["end"] = "2010-02-15"  # one more day after the seed, then nothing
    config = RetrainConfig.model_validate(document)
    commit(plan_ingest(config.dataset, config.source), config.dataset)
    mark_decided(config.dataset, read_dataset(config.dataset)["date"].max().to_pydatetime())

    # On the cluster: the day is committed, then the TrainingRun cannot be created.
    on_cluster = config.model_copy(update={"local": False})
    with pytest.raises(RetrainFailed, match="cannot create a TrainingRun in ml: 403 Forbidden"):
        retrain(on_cluster)
    assert refusing_kubeconfig == ["POST /apis/mlkube.io/v1alpha1/namespaces/ml/trainingruns"]
    assert [e["rows_added"] for e in read_ledger(config.dataset)] == [1080, 24]

    # The next run has no new hours, and still trains on that day.
    again = retrain(config)
    assert again.ingest.rows_added == 0 and again.decision.train
    assert again.decision.reason == (
        "no new hours, but 24 hours held (2010-02-15 00:00 to 2010-02-15 23:00) that no run "
        "has trained on yet"
    )
    assert again.training is not None and again.training.phase == "Succeeded"
    assert read_ledger_document(config.dataset).decided_through is not None

    # Then it is done: nothing new, nothing untrained.
    last = retrain(config)
    assert not last.trained
    assert last.decision.reason.startswith("no new data: the source has no hours after 2010-02-15")
