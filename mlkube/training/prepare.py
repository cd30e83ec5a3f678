"""A TrainingRun checked against its task and data before anything slow starts.

`preflight` is what can be refused in a fraction of a second, before Ray, Prefect and
MLflow are imported or started: an unknown or unimportable task, a missing extra, a local
dataset that is missing or unreadable, a target column not in its header, a problem the
task can't solve, a scheduler, search space or grid the task can't take, GPUs this
machine lacks. `prepare` then reads the data and checks the metric, which can depend on it.
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from typing import Any

from mlkube.api import TrainingRun, UserError
from mlkube.api.errors import first_line
from mlkube.training.search_space import grid_points, grid_size
from mlkube.training.tasks import Task, TaskData, TaskError, installed, resolve_task
from mlkube.training.tasks.base import DataError, SearchSpace
from mlkube.training.tasks.data import local_path
from mlkube.training.tune import SearchSettings

MISSING_EXTRA = (
    "pip install 'mlkube[torch]', or on a cluster spec.ray.image: mlkube/runtime-full "
    "(the runtime image has no torch)"
)


@dataclass
class Prepared:
    """A TrainingRun checked against its task and data, ready to train."""

    run: TrainingRun
    task: Task
    data: TaskData
    settings: SearchSettings


def preflight(run: TrainingRun) -> Task:
    """The checks that need neither Ray nor Prefect nor the whole dataset; returns the task
    with spec.dataset.problem applied. Raises UserError with one line."""
    the_task = resolve_task(run.spec.task)
    for module in the_task.model_modules:
        if not installed(module):
            top = module.split(".")[0]
            raise UserError(
                f"spec.task: {run.spec.task} needs {top}, which this install lacks: {MISSING_EXTRA}"
            )
    problem = run.spec.dataset.problem
    if problem != "auto" and problem not in the_task.problems:
        can = " or ".join(the_task.problems) or "no choice of problem"
        raise TaskError(f"dataset.problem: task {run.spec.task} solves {can}, not {problem}")
    the_task.problem = problem
    if run.spec.dataset.uri:
        check_local_dataset(run.spec.dataset.uri, run.spec.dataset.target)
    check_search(run, the_task)
    check_gpus(run)
    return the_task


def check_local_dataset(uri: str, target: str | None) -> None:
    """A local file must exist and be readable; a CSV's header must name the target."""
    path = local_path(uri)
    if path is None:
        return  # remote: read later, with the same one-line errors
    if not path.is_file():
        raise DataError(f"dataset.uri: no such file: {uri}")
    try:
        with path.open("rb") as stream:
            head = stream.read(64 * 1024)
    except OSError as error:
        raise DataError(f"dataset.uri: cannot read {uri}: {first_line(error)}") from None
    if not target or path.suffix.lower() not in (".csv", ".txt", ""):
        return
    first = head.decode("utf-8", errors="replace").splitlines()[:1]
    columns = next(csv.reader(first), []) if first else []
    if target not in columns:
        raise DataError(
            f"dataset.target: column {target!r} not in {uri} (columns: {', '.join(columns)})"
        )


def check_gpus(run: TrainingRun) -> None:
    """A local search that asks for GPUs on a machine without any would wait forever."""
    wanted = run.spec.resources.gpu
    if not wanted or os.environ.get("RAY_ADDRESS"):
        return  # on a cluster, the Ray cluster says (mlkube.training.tune)
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not glob.glob("/dev/nvidia[0-9]*"):
        raise UserError(
            f"spec.resources.gpu: each trial asks for {wanted:g} GPU, and this machine has "
            "none (no /dev/nvidia*); leave it out to train on the CPU"
        )


def check_search(
    run: TrainingRun, the_task: Task
) -> tuple[SearchSpace, dict[str, list[Any]] | None]:
    """The search against the task, without its data: scheduler, parameters, grid, choices.
    Returns the search space and, for algorithm grid, its points."""
    tuning = run.spec.tuning
    if tuning.scheduler != "fifo" and not the_task.has_epochs:
        raise TaskError(
            f"spec.tuning.scheduler: {tuning.scheduler} stops trials between epochs, and "
            f"task {run.spec.task} reports once per trial (use fifo)"
        )
    unknown = sorted(set(tuning.search_space) - set(the_task.search_space))
    if unknown:
        raise TaskError(
            f"spec.tuning.searchSpace.{unknown[0]}: task {run.spec.task} has no such "
            f"parameter (it tunes {', '.join(the_task.search_space)})"
        )
    # The spec's ranges replace the task's of the same name.
    override = {name: d.to_k8s() for name, d in tuning.search_space.items()}
    space = {**the_task.search_space, **override}
    grid = None
    if tuning.algorithm == "grid":
        try:
            grid = grid_points(space, tuning.num_trials)
        except ValueError as error:
            raise TaskError(f"spec.tuning.numTrials: {error}") from None
    if tuning.algorithm == "tpe":
        check_tpe_choices(space)
    return space, grid


def search_settings(run: TrainingRun, the_task: Task) -> SearchSettings:
    """What to search, with the task's defaults filled in; refuses what the task can't do."""
    tuning = run.spec.tuning
    metric = tuning.metric or the_task.metric
    if metric not in the_task.metric_names():
        raise TaskError(
            f"spec.tuning.metric: {metric!r} is not reported by task {run.spec.task} "
            f"(choose one of: {', '.join(the_task.metric_names())})"
        )
    space, grid = check_search(run, the_task)
    return SearchSettings(
        num_trials=grid_size(grid) if grid is not None else tuning.num_trials,
        max_concurrent_trials=tuning.max_concurrent_trials,
        metric=metric,
        mode=tuning.mode or the_task.mode_for(metric),
        scheduler=tuning.scheduler,
        search_space=space,
        timeout_seconds=tuning.timeout_seconds,
        seed=tuning.seed,
        max_epochs=the_task.budget(space),
        algorithm=tuning.algorithm,
        grid=grid,
        gpus_per_trial=run.spec.resources.gpu,
        keep_state=the_task.checkpoints,
    )


def check_tpe_choices(space: SearchSpace) -> None:
    """Optuna's categorical values are numbers, strings, booleans or null."""
    for name, distribution in space.items():
        for value in distribution.get("choice", []):
            if value is not None and not isinstance(value, bool | int | float | str):
                raise TaskError(
                    f"spec.tuning.searchSpace.{name}: tpe takes choices of numbers, strings "
                    f"or booleans, not {type(value).__name__}"
                )


def prepare(run: TrainingRun) -> Prepared:
    """Load and validate: raises UserError with one line when the run cannot train."""
    the_task = preflight(run)
    data = the_task.load(run.spec.dataset.uri, run.spec.dataset.target, run.spec.tuning.seed)
    # The metric can depend on the data (classification or regression): validate after.
    return Prepared(run, the_task, data, search_settings(run, the_task))
