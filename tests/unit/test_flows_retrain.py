"""The retrain flow's pure parts: the TrainingRun it applies, its report, its CLI input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlkube.cli import main as cli_main
from mlkube.flows.commands import load_config
from mlkube.flows.retrain import LABEL_FLOW_RUN_ID, FlowIdentity, trainingrun_body
from mlkube.flows.retrain_models import RetrainOutcome, TrainDecision, TrainingOutcome
from mlkube.flows.retrain_report import artifact_key, markdown_report
from tests.unit.test_flows_checks import step

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "atmos-temperature"


def test_the_examples_load() -> None:
    for name in ("retrain.yaml", "retrain-replay.yaml"):
        config = load_config(str(EXAMPLE / name))
        assert config.template().spec.task == "atmos-temperature"
    assert load_config(str(EXAMPLE / "retrain.yaml")).source.station_id == 108


def test_the_trainingrun_links_back_to_the_flow_run() -> None:
    config = load_config(str(EXAMPLE / "retrain.yaml"))
    identity = FlowIdentity(flow_run_id="0b9d2f1e-1111-2222-3333-444455556666",
                            flow_run_name="clever-otter", deployment="retrain atmos")  # fmt: skip
    body = trainingrun_body(config.template(), "s3://b/d.parquet", identity, step(24), "why")
    metadata = body["metadata"]
    assert "name" not in metadata and metadata["generateName"] == "atmos-temperature-"
    assert metadata["labels"][LABEL_FLOW_RUN_ID] == identity.flow_run_id
    assert metadata["labels"]["mlkube.io/flow-run-name"] == "clever-otter"
    assert metadata["labels"]["mlkube.io/deployment"] == "retrain-atmos"  # a valid label value
    assert metadata["annotations"]["mlkube.io/dataset-through"] == "2010-03-31T23:00:00"
    assert body["spec"]["dataset"]["uri"] == "s3://b/d.parquet"
    assert body["spec"]["tuning"]["numTrials"] == 8  # the template's, untouched


def test_the_report_says_what_was_added_and_why_training_was_skipped() -> None:
    outcome = RetrainOutcome(
        flow_run_id=None, ingest=step(0).record, checks=step(0).checks,
        decision=TrainDecision(train=False, reason="no new data: the source has no hours after x"),
    )  # fmt: skip
    text = markdown_report(outcome, "atmos-temperature")
    assert "**Training skipped**: no new data" in text and "Nothing new to check." in text
    assert (
        outcome.summary()
        == "0 new hours; training skipped: no new data: the source has no hours after x"
    )

    trained = outcome.model_copy(update={
        "decision": TrainDecision(train=True, reason="24 new hours"),
        "training": TrainingOutcome(
            trainingrun="atmos-temperature-x1y2z", namespace="ml", phase="Succeeded",
            model_name="atmos-temperature", model_version=3, promoted=False,
            promotion_reason="not better than v2", metric="mae", best_value=1.5),
    })  # fmt: skip
    text = markdown_report(trained, "atmos-temperature")
    assert "version **3**, **not promoted**: not better than v2" in text
    assert "| `ml/atmos-temperature-x1y2z` | Succeeded | 3 | False |" in text
    assert artifact_key("Atmos_Temperature.v2") == "retrain-atmos-temperature-v2"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"source": {"kind": "ftp"}}, "source: Input tag 'ftp' found using 'kind' does not match"),
        ({"source": {"kind": "replay"}, "dataset": {"uri": "d.csv"}},
         "give exactly one of trainingrunFile, trainingrun"),
        ({"source": {"kind": "replay"}, "dataset": {"uri": "d.csv"},
          "trainingrunFile": "nope.yaml"},
         "nope.yaml: no such file"),
        ({"source": {"kind": "kma-asos", "stationId": 0}, "dataset": {"uri": "d.csv"},
          "trainingrunFile": "x"}, "source.kma-asos.stationId: Input should be greater than"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: dict, message: str
) -> None:
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(document))
    assert cli_main(["retrain", "-f", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") or err.startswith("error: ")
    assert message in err and err.count("\n") == 1
