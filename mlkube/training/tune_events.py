"""Tune's trial events handed to the search's observer, and what runs inside each trial.

Tune pickles its callbacks into the experiment's state and, when a search resumes, calls the
pickled ones: so the callback holds nothing and asks for the observer of the search now
running (`observe`), and the trial function is a module-level one.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ray import tune

from mlkube.training.search_space import config_key
from mlkube.training.tasks.base import Task, TaskData

STATE_FILE = "state.pkl"


class TrialObserver(Protocol):
    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None: ...
    def trial_result(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None: ...
    def trial_ended(self, trial_id: str, error: str | None) -> None: ...


_observer: TrialObserver | None = None


def observe(observer: TrialObserver | None) -> None:
    """Sets the observer that Tune's events of this process go to (None: nobody)."""
    global _observer
    _observer = observer


# Keys Tune adds to every result; everything else is the task's own metrics.
_TUNE_KEYS = {
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid",
    "time_since_restore", "iterations_since_restore", "done", "trial_id", "date",
    "hostname", "node_ip", "checkpoint_dir_name", "should_checkpoint",
}  # fmt: skip


def trial_metric_keys(result: Mapping[str, Any]) -> set[str]:
    return {k for k in result if k not in _TUNE_KEYS and "/" not in k}


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1][:500]
    return "trial failed"


class ObserverCallback(tune.Callback):
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if _observer is not None:
            _observer.trial_started(trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if _observer is None:
            return
        metrics = {
            k: float(result[k])
            for k in trial_metric_keys(result)
            if isinstance(result[k], int | float) and not isinstance(result[k], bool)
        }
        _observer.trial_result(trial.trial_id, metrics, int(result.get("training_iteration", 1)))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if _observer is not None:
            _observer.trial_ended(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if _observer is not None:
            _observer.trial_ended(trial.trial_id, _trial_error(trial))


class Reporter:
    """What a task's train() calls after each epoch: Tune's report, with the task's state as a
    checkpoint when the search keeps state. `restored` is the state a resumed trial left."""

    def __init__(self, keep_state: bool) -> None:
        self.keep_state = keep_state
        self.restored: Any = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                path = Path(folder) / STATE_FILE
                if path.exists():
                    self.restored = pickle.loads(path.read_bytes())

    def __call__(self, metrics: Mapping[str, float], state: Any = None) -> None:
        if state is None or not self.keep_state:
            tune.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory(prefix="mlkube-trial-") as folder:
            (Path(folder) / STATE_FILE).write_bytes(pickle.dumps(state))
            tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(folder))


def run_trial(
    config: dict[str, Any],
    task: Task,
    data: TaskData,
    seed: int,
    keep_state: bool,
    finished: Mapping[str, Mapping[str, float]],
) -> None:
    """One trial. A trial whose result an earlier attempt of the search recorded (by trial
    id, or by configuration for a seeded search that drew it again) reports that result and
    is not trained again."""
    from threadpoolctl import threadpool_limits

    known = finished.get(tune.get_context().get_trial_id()) or finished.get(config_key(config))
    if known is not None:
        tune.report(dict(known))
        return
    # Trials run side by side on few cores: one thread each is faster than fighting.
    with threadpool_limits(1):
        task.train(config, data, report=Reporter(keep_state), seed=seed)
