"""Built-in tasks by name, and users' own as `package.module:function`."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from mlkube.api.errors import UserError
from mlkube.training.tasks.base import DataError, Mode, Report, SearchSpace, Task, TaskData


class TaskError(UserError):
    """The task named in spec.task cannot be used; one line for the user."""


def _tabular() -> Task:
    from mlkube.training.tasks.tabular import TabularTask

    return TabularTask()


def _insurance() -> Task:
    from mlkube.training.tasks.tabular import InsuranceTask

    return InsuranceTask()


def _atmos_temperature() -> Task:
    from mlkube.training.tasks.atmos_temperature import AtmosTemperatureTask

    return AtmosTemperatureTask()


def _mnist() -> Task:
    from mlkube.training.tasks.mnist import MnistTask

    return MnistTask()


BUILTIN: dict[str, Callable[[], Task]] = {
    "tabular": _tabular,
    "insurance": _insurance,
    "atmos-temperature": _atmos_temperature,
    "mnist": _mnist,
}


def installed(module: str) -> bool:
    """Whether the module's top-level package is in this environment (the runtime image
    without the torch extra has no torch)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def resolve_task(name: str) -> Task:
    if name in BUILTIN:
        return BUILTIN[name]()
    module_name, _, function_name = name.partition(":")
    if not function_name:
        raise TaskError(f"spec.task: unknown task {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskError(f"spec.task: cannot import {module_name!r}: {error}") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise TaskError(f"spec.task: {module_name} has no function {function_name!r}")
    task = factory()
    if not isinstance(task, Task):
        raise TaskError(f"spec.task: {name} returned {type(task).__name__}, not a Task")
    return task


__all__ = [
    "BUILTIN",
    "DataError",
    "Mode",
    "Report",
    "SearchSpace",
    "Task",
    "TaskData",
    "TaskError",
    "installed",
    "resolve_task",
]
