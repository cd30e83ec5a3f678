"""Bad input to `mlkube train`: one line naming the problem, exit 2, nothing in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from mlkube.cli import main as cli_main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("ray_local", "prefect_api", "local_mlflow"),
]


def document(model_name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "bad"},
        "spec": {"task": "insurance", "model": {"name": model_name}, **spec},
    }


CASES = {
    "unknown task": (
        lambda d, csv: d["spec"].update(task="forecasting"),
        "spec.task: unknown task",
    ),
    "unknown user task": (
        lambda d, csv: d["spec"].update(task="no_such_package.tasks:make"),
        "spec.task: cannot import 'no_such_package.tasks'",
    ),
    "numTrials 0": (
        lambda d, csv: d["spec"].update(tuning={"numTrials": 0}),
        "spec.tuning.numTrials: Input should be greater than or equal to 1",
    ),
    "misspelt field": (
        lambda d, csv: d["spec"].update(tunning={"numTrials": 2}),
        "spec.tunning: unknown field",
    ),
    "missing dataset file": (
        lambda d, csv: d["spec"].update(dataset={"uri": "/no/such/insurance.csv"}),
        "dataset.uri: no such file: /no/such/insurance.csv",
    ),
    "no target column": (
        lambda d, csv: d["spec"].update(dataset={"uri": str(csv), "target": "premium"}),
        "dataset.target: column 'premium' not in",
    ),
    "unknown searchSpace parameter": (
        lambda d, csv: d["spec"].update(
            dataset={"uri": str(csv)}, tuning={"searchSpace": {"depth": {"choice": [1, 2]}}}
        ),
        "spec.tuning.searchSpace.depth: task insurance has no such parameter",
    ),
    "problem the task cannot solve": (
        lambda d, csv: d["spec"].update(task="mnist", dataset={"problem": "regression"}),
        "dataset.problem: task mnist solves classification, not regression",
    ),
    "regression on a text target": (
        lambda d, csv: d["spec"].update(
            task="tabular",
            dataset={"uri": str(csv), "target": "smoker", "problem": "regression"},
        ),
        "dataset.problem: a regression needs a numeric target; 'smoker' holds object values",
    ),
    "metric that does not fit the problem": (
        lambda d, csv: d["spec"].update(dataset={"uri": str(csv)}, tuning={"metric": "accuracy"}),
        "spec.tuning.metric: 'accuracy' is not reported by task insurance "
        "(choose one of: mae, rmse, r2)",
    ),
    "unknown problem": (
        lambda d, csv: d["spec"].update(dataset={"uri": str(csv), "problem": "ranking"}),
        "spec.dataset.problem: Input should be 'auto', 'regression' or 'classification'",
    ),
    "unknown algorithm": (
        lambda d, csv: d["spec"].update(tuning={"algorithm": "bayes"}),
        "spec.tuning.algorithm: Input should be 'random', 'grid' or 'tpe'",
    ),
    "unknown scheduler": (
        lambda d, csv: d["spec"].update(tuning={"scheduler": "pbt"}),
        "spec.tuning.scheduler: Input should be 'fifo', 'asha' or 'hyperband'",
    ),
    "early stopping for a task that reports once": (
        lambda d, csv: d["spec"].update(
            task="tests.fixtures.user_task:diabetes_ridge", tuning={"scheduler": "hyperband"}
        ),
        "spec.tuning.scheduler: hyperband stops trials between epochs, and task "
        "tests.fixtures.user_task:diabetes_ridge reports once per trial (use fifo)",
    ),
    "a grid larger than numTrials": (
        lambda d, csv: d["spec"].update(task="mnist", tuning={"algorithm": "grid", "numTrials": 3}),
        "spec.tuning.numTrials: a grid over the choices of channels, hidden has 4 points, "
        "more than 3 trials",
    ),
    "GPUs this machine lacks": (
        lambda d, csv: d["spec"].update(dataset={"uri": str(csv)}, resources={"gpu": 1}),
        "spec.resources.gpu: each trial asks for 1 GPU, and this machine has none",
    ),
    "negative GPUs": (
        lambda d, csv: d["spec"].update(resources={"gpu": -1}),
        "spec.resources.gpu: Input should be greater than or equal to 0",
    ),
    "a storage claim that is no name": (
        lambda d, csv: d["spec"].update(tuning={"storage": {"claimName": "My Claim"}}),
        "spec.tuning.storage.claimName: String should match pattern",
    ),
    "wrong apiVersion": (
        lambda d, csv: d.update(apiVersion="mlkube.io/v1"),
        "apiVersion must be mlkube.io/v1alpha1",
    ),
    "wrong kind": (lambda d, csv: d.update(kind="ModelDeployment"), "kind must be TrainingRun"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_trainingrun_is_refused_with_one_line(
    case: str,
    tmp_path: Path,
    model_name: str,
    insurance_csv: Path,
    local_mlflow: MlflowClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    change, expected = CASES[case]
    bad = document(model_name)
    change(bad, insurance_csv)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))

    assert cli_main(["train", "-f", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert local_mlflow.search_registered_models(f"name = '{model_name}'") == []
    assert local_mlflow.get_experiment_by_name(model_name) is None


def test_malformed_yaml_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: mlkube.io/v1alpha1\nkind: TrainingRun\nspec: [task: x\n")
    assert cli_main(["train", "-f", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: malformed YAML at line") and "\n" not in err


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "-f", "/no/such/run.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: /no/such/run.yaml: no such file"


def test_rayjob_entrypoint_refuses_bad_input_without_traceback(
    tmp_path: Path, model_name: str
) -> None:
    """The command a RayJob runs, as a process: exit 2 and one line on stderr."""
    bad = document(model_name, dataset={"uri": "/no/such/file.csv"})
    completed = subprocess.run(
        [sys.executable, "-m", "mlkube.flows.train", "--spec-json", __import__("json").dumps(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"},
        timeout=300,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: dataset.uri: no such file: /no/such/file.csv"
    )
