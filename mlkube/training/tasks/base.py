"""The task interface: what a built-in or user task gives the training pipeline.

A task is as small as an MLflow pyfunc: it loads its data, trains one configuration
(reporting validation metrics as it goes), logs a fitted model to MLflow, and scores a
logged model on held-out data. Users write `package.module:function` returning a Task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mlkube.api.errors import UserError

Mode = Literal["min", "max"]
Problem = Literal["auto", "regression", "classification"]
# Same syntax as TrainingRun.spec.tuning.searchSpace, e.g. {"lr": {"loguniform": [1e-4, 0.1]}}.
SearchSpace = dict[str, dict[str, Any]]
# `report(metrics)` after each epoch (or boosting round); `report(metrics, state)` also
# hands over what the task needs to go on from there: a trial whose search resumes after
# its driver died gets it back through `restored_state(report)`.
Report = Callable[..., None]


def highest(distribution: dict[str, Any]) -> float:
    """The largest value a search-space distribution can give (randint's high is excluded)."""
    ((kind, args),) = distribution.items()
    if kind == "choice":
        return float(max(args))
    if kind == "randint":
        return float(args[1] - 1)
    return float(args[1])


def restored_state(report: Report) -> Any:
    """The state the trial last reported before it stopped, or None on a fresh start."""
    return getattr(report, "restored", None)


class DataError(UserError):
    """The dataset cannot be used by the task; the message is one line for the user."""


@dataclass
class TaskData:
    """`search` is all the tuning may see; `holdout` is kept for the final evaluation."""

    search: Any
    holdout: Any
    description: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    name: str = "task"
    metric: str = "loss"
    mode: Mode = "min"
    # Metrics reported per epoch make learning curves; ASHA needs more than one report.
    has_epochs: bool = False
    # Most epochs one trial trains for (ASHA's max_t) in the task's own search space.
    max_epochs: int = 1
    # Worth a checkpoint at every report (an epoch of a network); otherwise a trial that
    # was running when its search's driver died starts over when the search resumes.
    checkpoints: bool = False
    # What log_model imports; the flow imports them while it waits for Ray and Prefect, and
    # a warm head's zygote ahead of every run (mlkube.training.preload).
    model_modules: tuple[str, ...] = ("mlflow.models",)
    # What a trial imports in its Ray worker; on warm clusters the workers import them as
    # they start (mlkube.training.trial_workers), before a trial is given to them.
    trial_modules: tuple[str, ...] = ()
    # What spec.dataset.problem may say besides "auto"; the flow sets `problem` before load.
    problems: tuple[Problem, ...] = ()
    problem: Problem = "auto"

    @property
    @abstractmethod
    def search_space(self) -> SearchSpace: ...

    @abstractmethod
    def load(self, uri: str | None, target: str | None, seed: int) -> TaskData:
        """Read and split the data. Raise DataError with a one-line reason when unusable."""

    @abstractmethod
    def train(self, config: Mapping[str, Any], data: TaskData, report: Report, seed: int) -> None:
        """Train one configuration on data.search and report validation metrics (per epoch
        for tasks with epochs). Must not look at data.holdout."""

    @abstractmethod
    def fit(self, config: Mapping[str, Any], data: TaskData, seed: int) -> Any:
        """Fit the chosen configuration on all of data.search; returns the model."""

    @abstractmethod
    def log_model(self, model: Any, data: TaskData, name: str) -> str:
        """Log the model (with signature and input example) into the active MLflow run;
        returns the logged model's URI."""

    @abstractmethod
    def evaluate(self, loaded_model: Any, data: TaskData) -> dict[str, float]:
        """Metrics of an MLflow pyfunc model on data.holdout (including self.metric)."""

    def budget(self, space: SearchSpace) -> int:
        """Most epochs a trial of `space` trains for: the schedulers' max_t."""
        return self.max_epochs

    def metric_names(self) -> list[str]:
        return [self.metric]

    def mode_for(self, metric: str) -> Mode:
        """Whether less or more of `metric` is better, when the spec does not say."""
        return self.mode
