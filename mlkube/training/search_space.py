"""The search-space syntax of TrainingRun.spec.tuning.searchSpace, turned into Ray Tune's."""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from typing import Any

from mlkube.training.tasks.base import SearchSpace


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


def _range_points(kind: str, args: list[Any], count: int) -> list[Any]:
    """`count` evenly spaced values of a range (log-spaced for loguniform), ends included;
    one value is the middle."""
    low, high = args
    if kind == "randint":
        high -= 1  # high is excluded
        if count == 1:
            return [int((low + high) // 2)]
        return sorted({int(round(low + (high - low) * i / (count - 1))) for i in range(count)})
    if kind == "loguniform":
        low, high = math.log(low), math.log(high)
    if count == 1:
        points = [(low + high) / 2]
    else:
        points = [low + (high - low) * i / (count - 1) for i in range(count)]
    return [math.exp(p) if kind == "loguniform" else p for p in points]


def grid_size(grid: dict[str, list[Any]]) -> int:
    return math.prod(len(values) for values in grid.values())


def grid_points(space: SearchSpace, max_trials: int) -> dict[str, list[Any]]:
    """The grid of `algorithm: grid`: every value of a choice, and for each range evenly
    spaced points, one more per range in turn while the grid stays within max_trials (a
    randint range has no more points than integers). Raises ValueError when the choices
    alone make a larger grid."""
    choices = {n: list(d["choice"]) for n, d in space.items() if "choice" in d}
    ranges = {n: d for n, d in space.items() if "choice" not in d}
    fixed = grid_size(choices)
    if fixed > max_trials:
        raise ValueError(
            f"a grid over the choices of {', '.join(choices)} has {fixed} points, more than "
            f"{max_trials} trials"
        )

    def most(distribution: dict[str, Any]) -> int:
        ((kind, args),) = distribution.items()
        return int(args[1] - args[0]) if kind == "randint" else max_trials

    counts = dict.fromkeys(ranges, 1)
    grew = True
    while grew:
        grew = False
        for name in ranges:
            bigger = {**counts, name: counts[name] + 1}
            fits = fixed * math.prod(bigger.values()) <= max_trials
            if fits and counts[name] < most(ranges[name]):
                counts, grew = bigger, True
    grid = dict(choices)
    for name, distribution in ranges.items():
        ((kind, args),) = distribution.items()
        grid[name] = _range_points(kind, list(args), counts[name])
    return {name: grid[name] for name in space}


def grid_to_tune(grid: dict[str, list[Any]]) -> dict[str, Any]:
    from ray import tune

    return {name: tune.grid_search(values) for name, values in grid.items()}


def plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers as plain Python numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def logged_value(text: str) -> Any:
    """A trial's parameter as MLflow kept it (str() of the value Tune drew) turned back into
    that value: numbers, booleans, None and lists as Python reads them, anything else the
    string itself. A resumed search fits its best trial from these."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return text if isinstance(value, str | bytes) else value


def config_key(config: Mapping[str, Any]) -> str:
    """A trial's configuration as one string, the same for the values Tune draws and for the
    parameters MLflow keeps (which are strings)."""
    return json.dumps({k: str(plain(v)) for k, v in config.items()}, sort_keys=True)
