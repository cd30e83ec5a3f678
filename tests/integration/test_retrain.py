"""The retrain loop on one machine: replay ingest -> checks -> local train flow -> report.

Real Ray, real MLflow store, real Prefect API; a tiny training budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlkube.cli import main as cli_main
from mlkube.flows.ingest import DatasetSettings, commit, plan_ingest, read_dataset, read_ledger
from mlkube.flows.retrain import RetrainConfig, artifact_key, retrain

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
