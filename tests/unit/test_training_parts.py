"""Pure parts of the training package."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from mlkube.api import TrainingRun, parse_resource
from mlkube.training.search_space import config_key, grid_points, grid_size, logged_value, plain
from mlkube.training.tasks import BUILTIN, TaskError, resolve_task
from mlkube.training.tasks.atmos_temperature import HOURS_IN, HOURS_OUT, hourly_series, windows
from mlkube.training.tasks.tabular import ROUND_ITERATIONS, is_classification
from mlkube.training.tracking import is_better


def test_a_trainingruns_search_space_replaces_the_tasks_ranges_it_names() -> None:
    from mlkube.training.prepare import search_settings

    task = resolve_task("insurance")
    default = dict(task.search_space)
    run = run_of("insurance", searchSpace={"max_iter": {"choice": [100, 200]}})
    space = search_settings(run, task).search_space
    assert space == {**default, "max_iter": {"choice": [100, 200]}}
    assert space["max_iter"] != default["max_iter"]
    assert search_settings(run_of("insurance"), task).search_space == default


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


def run_of(task: str, **tuning: Any) -> TrainingRun:
    run = parse_resource(
        {
            "apiVersion": "mlkube.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "r"},
            "spec": {"task": task, "model": {"name": "m"}, "tuning": tuning},
        }
    )
    assert isinstance(run, TrainingRun)
    return run


def test_early_stopping_needs_a_task_that_reports_more_than_once() -> None:
    from mlkube.training.prepare import search_settings

    task = "tests.fixtures.user_task:diabetes_ridge"
    for scheduler in ("asha", "hyperband"):
        with pytest.raises(TaskError, match=f"spec.tuning.scheduler: {scheduler} stops trials"):
            search_settings(run_of(task, scheduler=scheduler), resolve_task(task))


@pytest.mark.parametrize("task", sorted(BUILTIN))
def test_every_builtin_task_can_stop_early_within_its_budget(task: str) -> None:
    """asha and hyperband are open to every built-in task; their max_t follows the space."""
    from mlkube.training.prepare import search_settings

    settings = search_settings(run_of(task, scheduler="hyperband"), resolve_task(task))
    assert settings.max_epochs > 1
    # Networks keep their state at every epoch; boosting rounds are rebuilt from the round.
    assert settings.keep_state is (task in ("mnist", "atmos-temperature"))
    if task in ("tabular", "insurance"):
        wider = run_of(task, searchSpace={"max_iter": {"randint": [10, 1001]}})
        assert search_settings(wider, resolve_task(task)).max_epochs == 1000 // ROUND_ITERATIONS
    else:
        longer = run_of(task, searchSpace={"epochs": {"choice": [3, 12]}})
        assert search_settings(longer, resolve_task(task)).max_epochs == 12


def test_a_grid_takes_every_choice_and_spreads_the_ranges_within_the_budget() -> None:
    space = {
        "lr": {"loguniform": [0.01, 1.0]},
        "depth": {"randint": [2, 4]},
        "kind": {"choice": ["a", "b"]},
    }
    grid = grid_points(space, 12)
    assert list(grid) == ["lr", "depth", "kind"]
    assert grid["kind"] == ["a", "b"] and grid["depth"] == [2, 3]
    assert grid["lr"] == pytest.approx([0.01, 0.1, 1.0])
    assert grid_size(grid) == 12
    # One point of a range is its middle (geometric for loguniform).
    assert grid_points({"lr": {"loguniform": [0.01, 1.0]}}, 1)["lr"] == pytest.approx([0.1])
    with pytest.raises(ValueError, match="has 6 points, more than 4 trials"):
        grid_points({"a": {"choice": [1, 2, 3]}, "b": {"choice": [1, 2]}}, 4)


def test_grid_and_tpe_settings_are_checked_against_the_spec() -> None:
    from mlkube.training.prepare import search_settings

    task = resolve_task("mnist")
    grid = search_settings(run_of("mnist", algorithm="grid", numTrials=20), task)
    assert grid.grid is not None and grid.num_trials == grid_size(grid.grid) <= 20
    with pytest.raises(TaskError, match="spec.tuning.numTrials: a grid over the choices"):
        search_settings(run_of("mnist", algorithm="grid", numTrials=3), task)
    weird = run_of("mnist", algorithm="tpe", searchSpace={"hidden": {"choice": [[1, 2]]}})
    with pytest.raises(TaskError, match="spec.tuning.searchSpace.hidden: tpe takes choices"):
        search_settings(weird, task)


def test_a_configuration_has_one_key_whether_drawn_or_read_back_from_mlflow() -> None:
    drawn = {"lr": np.float64(0.5), "depth": np.int64(3)}
    assert config_key(drawn) == config_key({"depth": "3", "lr": "0.5"})


def test_parameters_read_back_from_mlflow_are_the_values_tune_drew() -> None:
    """A resumed search fits its best trial from what MLflow kept: a float given as the
    string '0.29...' made scikit-learn refuse it (seen on the node, Ray head deleted)."""
    drawn = {"l2": np.float64(0.2995942429704568), "depth": 3, "early": True, "loss": "absolute",
             "layers": [64, 32], "seed": None}  # fmt: skip
    logged = {k: str(plain(v)) for k, v in drawn.items()}
    back = {k: logged_value(v) for k, v in logged.items()}
    assert back == drawn
    assert [type(v) for v in back.values()] == [float, int, bool, str, list, type(None)]
    assert config_key(back) == config_key(drawn)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_modules_a_task_logs_its_model_with_exist(name: str) -> None:
    """The train flow imports these ahead of time; a misspelt one would fail every run."""
    import importlib.util

    modules = resolve_task(name).model_modules
    assert modules
    assert all(importlib.util.find_spec(module) is not None for module in modules)
