"""The local training pipeline end to end: real Ray, real MLflow store, real Prefect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from mlkube.cli import main as cli_main
from mlkube.flows.train import TrainResult, train
from mlkube.training import outcome
from tests.integration.conftest import REPO, example, trainingrun

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("ray_local", "prefect_api", "local_mlflow"),
]

# A budget no search can do well with: one tree-boosting iteration at a tiny rate.
CRIPPLED = {
    "numTrials": 1,
    "searchSpace": {
        "max_iter": {"randint": [1, 2]},
        "learning_rate": {"loguniform": [0.001, 0.0011]},
    },
}


def write_run(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def parent_run(client: MlflowClient, result: TrainResult) -> Any:
    return client.get_run(result.run_id)


def trial_runs(client: MlflowClient, result: TrainResult) -> list[Any]:
    return client.search_runs(
        [result.experiment_id],
        filter_string=f"tags.`{outcome.TAG_PARENT_RUN}` = '{result.run_id}'",
    )


def test_insurance_example_promotes_only_a_better_model(
    tmp_path: Path,
    insurance_csv: Path,
    local_mlflow: MlflowClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    document = example("insurance")
    name = document["spec"]["model"]["name"]

    # 1. A weak first model: there is no champion, so it becomes the champion.
    weak = {**document, "spec": {**document["spec"], "tuning": CRIPPLED}}
    weak_file = write_run(tmp_path / "weak.yaml", weak)
    assert cli_main(["train", "-f", str(weak_file), "--dataset", str(insurance_csv)]) == 0
    assert int(local_mlflow.get_model_version_by_alias(name, "champion").version) == 1

    # 2. The example as users run it (8 trials): better, so champion moves to version 2.
    capsys.readouterr()
    example_file = str(REPO / "examples" / "insurance" / "trainingrun.yaml")
    assert cli_main(["train", "-f", example_file, "--dataset", str(insurance_csv)]) == 0
    shown = capsys.readouterr()
    assert "trial 8/8 done" in shown.err and "best mae=" in shown.err
    assert "version 2" in shown.out and "@champion -> v2" in shown.out
    assert int(local_mlflow.get_model_version_by_alias(name, "champion").version) == 2

    # 3. Weak again: registered as version 3 with alias challenger; champion stays.
    assert cli_main(["train", "-f", str(weak_file), "--dataset", str(insurance_csv)]) == 0
    assert "not better" in capsys.readouterr().out
    assert int(local_mlflow.get_model_version_by_alias(name, "champion").version) == 2
    assert int(local_mlflow.get_model_version_by_alias(name, "challenger").version) == 3

    versions = {int(v.version): v for v in local_mlflow.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == [1, 2, 3]
    # Same spec, same seed: the same search and the same model, to the last digit.
    assert versions[1].tags["holdout.mae"] == versions[3].tags["holdout.mae"]
    assert versions[2].tags["holdout.mae"] != versions[1].tags["holdout.mae"]


def test_parent_run_records_trials_and_outcome(
    insurance_csv: Path, model_name: str, local_mlflow: MlflowClient
) -> None:
    run = trainingrun(
        "recorded",
        {
            "task": "insurance",
            "dataset": {"uri": str(insurance_csv)},
            "model": {"name": model_name},
            "tuning": {"numTrials": 3},
        },
    )
    result = train(run, show_progress=False)
    parent = parent_run(local_mlflow, result)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert tags[outcome.TAG_ROLE] == "parent" and tags[outcome.TAG_NAME] == "recorded"
    assert tags[outcome.TAG_UID].startswith("local-")
    recorded = outcome.outcome_from_tags(result.run_id, parent.info.status, tags)
    assert recorded.trials_completed == recorded.trials_total == 3
    assert recorded.model_version == 1 and recorded.promoted is True
    assert recorded.best_value == pytest.approx(result.best_value)
    assert recorded.best_params["max_iter"] == str(result.best_params["max_iter"])

    trials = trial_runs(local_mlflow, result)
    assert len(trials) == 3
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert {"learning_rate", "max_iter"} <= set(trial.data.params)
        assert "mae" in trial.data.metrics
    # The parent run is found the way the operator looks it up.
    wanted = outcome.trainingrun_filter(tags[outcome.TAG_UID], tags[outcome.TAG_NAMESPACE])
    found = local_mlflow.search_runs([result.experiment_id], filter_string=wanted)
    assert [r.info.run_id for r in found] == [result.run_id]
    # The registered version carries signature and input example.
    version = local_mlflow.get_model_version(model_name, "1")
    info = __import__("mlflow").models.get_model_info(version.source)
    assert info.signature is not None
    assert {"age", "smoker", "region"} <= set(info.signature.inputs.input_names())
    assert info.saved_input_example_info is not None


@pytest.fixture
def classification_csv(tmp_path: Path, insurance_csv: Path) -> Path:
    """The insurance table with a yes/no label: whether a person smokes."""
    path = tmp_path / "smokers.csv"
    pd.read_csv(insurance_csv).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("tabular", {"tuning": {"numTrials": 2, "metric": "roc_auc"}}),
        (
            "atmos-temperature",
            {
                "tuning": {
                    "numTrials": 2,
                    "scheduler": "asha",
                    "searchSpace": {"epochs": {"choice": [2]}, "hidden": {"choice": [16]}},
                }
            },
        ),
        (
            "mnist",
            {
                "tuning": {
                    "numTrials": 2,
                    "scheduler": "asha",
                    "searchSpace": {"epochs": {"choice": [2]}, "channels": {"choice": [8]}},
                }
            },
        ),
        ("tests.fixtures.user_task:diabetes_ridge", {"tuning": {"numTrials": 2}}),
    ],
)
def test_every_task_trains_registers_and_promotes(
    task: str,
    extra: dict[str, Any],
    model_name: str,
    classification_csv: Path,
    local_mlflow: MlflowClient,
) -> None:
    spec: dict[str, Any] = {"task": task, "model": {"name": model_name}, **extra}
    if task == "tabular":
        spec["dataset"] = {"uri": str(classification_csv), "target": "smoker"}
    result = train(trainingrun("every-" + re.sub(r"[^a-z0-9]+", "-", task)[:30].strip("-"), spec),
                   show_progress=False)  # fmt: skip
    assert result.version == 1 and result.promoted
    assert int(local_mlflow.get_model_version_by_alias(model_name, "champion").version) == 1
    assert result.metric in result.holdout
    if task == "tabular":
        # A metric from probabilities, where more is better without the spec saying so.
        assert result.metric == "roc_auc" and result.mode == "max"
        assert result.holdout["roc_auc"] > 0.9 and result.holdout["accuracy"] > 0.8
        assert set(result.holdout) == {"accuracy", "f1", "log_loss", "roc_auc"}
    if task in ("atmos-temperature", "mnist"):
        # Learning curves: one point per epoch in some trial's nested run.
        histories = [
            local_mlflow.get_metric_history(t.info.run_id, result.metric)
            for t in trial_runs(local_mlflow, result)
        ]
        assert max(len(h) for h in histories) == 2


def test_an_integer_target_is_a_regression_when_the_user_says_so(
    model_name: str, insurance_csv: Path
) -> None:
    """`children` (0-5) would be taken as six classes; `problem: regression` makes it a
    regression, and r2 is maximised without the spec giving a mode."""
    spec = {
        "task": "tabular",
        "model": {"name": model_name},
        "dataset": {"uri": str(insurance_csv), "target": "children", "problem": "regression"},
        "tuning": {"numTrials": 2, "metric": "r2"},
    }
    result = train(trainingrun("children-regression", spec), show_progress=False)
    assert result.metric == "r2" and result.mode == "max"
    assert set(result.holdout) == {"mae", "rmse", "r2"}
    assert result.best_value == max(t.value for t in result.trials if t.value is not None)


def test_mnist_model_explains_with_nearest_training_examples(
    model_name: str, local_mlflow: MlflowClient
) -> None:
    import mlflow.pyfunc
    from sklearn.datasets import load_digits

    spec = {
        "task": "mnist",
        "model": {"name": model_name},
        "tuning": {"numTrials": 1, "searchSpace": {"epochs": {"choice": [3]}}},
    }
    train(trainingrun("explained", spec), show_progress=False)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    digits = load_digits()
    pixels = (digits.data[:4] / 16.0).astype("float32")
    explained = model.unwrap_python_model().explain(pixels)
    assert len(explained) == 4
    for row, labels in zip(explained, model.predict(pixels), strict=True):
        assert row["label"] == labels
        assert len(row["nearest"]) == 3
        assert all(0 <= n["label"] <= 9 for n in row["nearest"])
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_tpe_with_hyperband_gives_the_same_trials_for_the_same_spec(
    model_name: str, insurance_csv: Path, local_mlflow: MlflowClient
) -> None:
    """Optuna's TPE, seeded, stopping by boosting rounds: two runs of one spec draw the same
    trials, and each trial reports its rounds (a learning curve per trial run)."""
    spec = {
        "task": "insurance",
        "model": {"name": model_name},
        "dataset": {"uri": str(insurance_csv)},
        "tuning": {"numTrials": 3, "maxConcurrentTrials": 1, "algorithm": "tpe",
                   "scheduler": "hyperband", "seed": 7,
                   "searchSpace": {"max_iter": {"choice": [100, 150]}}},
    }  # fmt: skip
    first = train(trainingrun("tpe-first", spec), show_progress=False)
    second = train(trainingrun("tpe-second", spec), show_progress=False)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert len({str(t.params) for t in first.trials}) == 3
    rounds = [
        len(local_mlflow.get_metric_history(t.info.run_id, "mae"))
        for t in trial_runs(local_mlflow, first)
    ]
    assert max(rounds) >= 2, rounds


def test_a_grid_runs_every_choice_and_spread_points_once(
    model_name: str, insurance_csv: Path
) -> None:
    spec = {
        "task": "insurance",
        "model": {"name": model_name},
        "dataset": {"uri": str(insurance_csv)},
        "tuning": {"numTrials": 5, "algorithm": "grid",
                   "searchSpace": {"max_iter": {"choice": [50, 100]},
                                   "learning_rate": {"loguniform": [0.01, 0.3]},
                                   "max_leaf_nodes": {"choice": [15]},
                                   "min_samples_leaf": {"choice": [20]},
                                   "l2_regularization": {"choice": [0.0]}}},
    }  # fmt: skip
    result = train(trainingrun("grid", spec), show_progress=False)
    # 2 choices x 2 points of the range fit in 5 trials; 3 points would not.
    drawn = sorted(
        (t.params["max_iter"], round(t.params["learning_rate"], 6)) for t in result.trials
    )
    assert drawn == [(50, 0.01), (50, 0.3), (100, 0.01), (100, 0.3)]
