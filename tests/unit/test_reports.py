"""The trials table `mlkube train` prints: readable at any terminal width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mlkube.flows.train import TrainResult, TrialSummary
from mlkube.reports import print_train_result

PARAMS = {
    "learning_rate": 0.0523,
    "max_iter": 212,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 17,
    "l2_regularization": 0.000123,
}


def result() -> TrainResult:
    return TrainResult(
        trainingrun="insurance",
        run_id="r" * 32,
        experiment_id="1",
        metric="mae",
        mode="min",
        trials=[
            TrialSummary(number=n, params=PARAMS, value=2500.0 + n, epochs=1) for n in range(3)
        ],
        best_params=PARAMS,
        best_value=2500.0,
        holdout={"mae": 2480.0},
        model_name="insurance",
        version=1,
        promoted=True,
        alias="champion",
        reason="first version",
        champion_version=None,
    )


@pytest.mark.parametrize("width", [60, 80, 200])
def test_no_parameter_name_is_cut_short(width: int) -> None:
    out = io.StringIO()
    print_train_result(result(), Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    unwrapped = "".join(text.split())
    for name in PARAMS:
        assert name in unwrapped, (name, text)
    assert "2500" in text and "2502" in text
