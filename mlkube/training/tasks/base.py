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
Report = Callable[[dict[str, float]], None]


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
    # Most epochs one trial trains for (ASHA's max_t).
    max_epochs: int = 1
    # What log_model imports; the flow imports them while it waits for Ray and Prefect.
    model_modules: tuple[str, ...] = ("mlflow.models",)
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

    def metric_names(self) -> list[str]:
        return [self.metric]

    def mode_for(self, metric: str) -> Mode:
        """Whether less or more of `metric` is better, when the spec does not say."""
        return self.mode
