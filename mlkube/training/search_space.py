"""The search-space syntax of TrainingRun.spec.tuning.searchSpace, turned into Ray Tune's."""

from __future__ import annotations

from typing import Any

from mlkube.training.tasks.base import SearchSpace


def merged_space(task_space: SearchSpace, override: SearchSpace) -> SearchSpace:
    """The task's default space with the user's entries put over it (and added to it)."""
    return {**task_space, **override}


def to_tune(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    converted: dict[str, Any] = {}
    for name, distribution in space.items():
        ((kind, args),) = distribution.items()
        if kind == "uniform":
            converted[name] = tune.uniform(*args)
        elif kind == "loguniform":
            converted[name] = tune.loguniform(*args)
        elif kind == "randint":
            converted[name] = tune.randint(*args)
        elif kind == "choice":
            converted[name] = tune.choice(list(args))
        else:
            raise ValueError(f"tuning.searchSpace.{name}: unknown distribution {kind!r}")
    return converted
