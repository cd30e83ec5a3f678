"""Pure parts of the training package."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlkube.api import TrainingRun, parse_resource
from mlkube.training.search_space import merged_space
from mlkube.training.tasks import BUILTIN, TaskError, resolve_task
from mlkube.training.tasks.atmos_temperature import HOURS_IN, HOURS_OUT, hourly_series, windows
from mlkube.training.tasks.tabular import is_classification
from mlkube.training.tracking import is_better


def test_user_search_space_overrides_and_extends_the_task_default() -> None:
    merged = merged_space(
        {"lr": {"loguniform": [1e-4, 1e-1]}, "epochs": {"randint": [2, 9]}},
        {"epochs": {"choice": [3]}},
    )
    assert merged == {"lr": {"loguniform": [1e-4, 1e-1]}, "epochs": {"choice": [3]}}


@pytest.mark.parametrize(
    ("values", "classification"),
    [([1.5, 2.5, 3.0], False), (["yes", "no", "yes"], True), ([0, 1, 1, 0], True)],
)
def test_classification_is_told_by_the_target(values: list, classification: bool) -> None:
    assert is_classification(pd.Series(values)) is classification


def test_windows_are_72_hours_in_and_the_next_24_out() -> None:
    series = np.arange(200, dtype="float64")
    x, y = windows(series, stride=10)
    assert x.shape[1] == HOURS_IN and y.shape[1] == HOURS_OUT
    assert y[0][0] == x[0][-1] + 1 and x[1][0] == 10


def test_hourly_series_sorts_and_fills_short_gaps() -> None:
    times = pd.date_range("2024-01-01", periods=6, freq="1h")
    frame = pd.DataFrame({"date": times[[5, 0, 1, 3, 4, 2]], "temp": [5, 0, 1, 3, 4, 2.0]})
    frame = frame.drop(index=3)  # the 03:00 reading is missing
    assert list(hourly_series(frame, "temp")) == [0, 1, 2, 3, 4, 5]


def test_is_better_respects_mode() -> None:
    assert is_better(1.0, None, "min") and is_better(1.0, 2.0, "min")
    assert not is_better(3.0, 2.0, "min") and is_better(3.0, 2.0, "max")


def test_unknown_user_task_is_a_one_line_error() -> None:
    with pytest.raises(TaskError, match="spec.task: cannot import 'nowhere'"):
        resolve_task("nowhere:make")
    with pytest.raises(TaskError, match="has no function 'missing'"):
        resolve_task("mlkube.training.tasks:missing")


def test_asha_needs_a_task_with_epochs() -> None:
    from mlkube.training.prepare import search_settings

    run = parse_resource(
        {
            "apiVersion": "mlkube.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "r"},
            "spec": {"task": "insurance", "model": {"name": "m"}, "tuning": {"scheduler": "asha"}},
        }
    )
    assert isinstance(run, TrainingRun)
    with pytest.raises(TaskError, match="spec.tuning.scheduler: asha needs a task with epochs"):
        search_settings(run, resolve_task("insurance"))


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_modules_a_task_logs_its_model_with_exist(name: str) -> None:
    """The train flow imports these ahead of time; a misspelt one would fail every run."""
    import importlib.util

    modules = resolve_task(name).model_modules
    assert modules
    assert all(importlib.util.find_spec(module) is not None for module in modules)
