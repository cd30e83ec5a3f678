"""MLflow registration and the promotion gate: the alias moves only to a better model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlkube.api.errors import first_line
from mlkube.training import outcome
from mlkube.training.tasks.base import Mode, Task, TaskData

CHALLENGER_ALIAS = "challenger"


@dataclass(frozen=True)
class Evaluation:
    """The new model and the current champion, scored on the same held-out data."""

    metric: str
    new: dict[str, float]
    champion_version: int | None
    champion: dict[str, float] | None
    champion_error: str | None = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def relative_gain(new: float, champion: float, mode: Mode) -> float:
    """How much better `new` is, as a fraction of the champion's value (mode-aware)."""
    gain = champion - new if mode == "min" else new - champion
    if champion == 0:
        return math.inf if gain > 0 else (0.0 if gain == 0 else -math.inf)
    return gain / abs(champion)


def decide(evaluation: Evaluation, mode: Mode, min_improvement: float, enabled: bool) -> Decision:
    """The promotion gate: strictly better than the champion, by at least min_improvement."""
    metric = evaluation.metric
    new = evaluation.new[metric]
    if not enabled:
        return Decision(False, "promotion is disabled for this TrainingRun")
    if evaluation.champion_version is None:
        return Decision(True, "no current champion to beat")
    if evaluation.champion is None:
        return Decision(
            True,
            f"champion v{evaluation.champion_version} could not be scored on this held-out "
            f"data ({evaluation.champion_error})",
        )
    champion = evaluation.champion[metric]
    if math.isnan(new):
        return Decision(False, f"{metric} is not a number on the held-out data")
    gain = relative_gain(new, champion, mode)
    comparison = (
        f"{metric} {new:.6g} vs champion v{evaluation.champion_version} {champion:.6g} "
        f"on the same held-out data ({gain:+.2%}; needed > 0 and >= {min_improvement:.2%})"
    )
    if gain > 0 and gain >= min_improvement:
        return Decision(True, f"better: {comparison}")
    return Decision(False, f"not better: {comparison}")


def version_by_alias(client: MlflowClient, name: str, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def evaluate(
    client: MlflowClient,
    task: Task,
    data: TaskData,
    model_uri: str,
    name: str,
    alias: str,
    metric: str,
) -> Evaluation:
    """Scores the logged model (what will be served) and the current alias holder on
    `metric`, the one the search optimised."""
    import mlflow.pyfunc

    new = task.evaluate(mlflow.pyfunc.load_model(model_uri), data)
    current = version_by_alias(client, name, alias)
    if current is None:
        return Evaluation(metric, new, None, None)
    try:
        champion = task.evaluate(mlflow.pyfunc.load_model(f"models:/{name}/{current}"), data)
    except Exception as error:  # a champion of another shape must not block a new model
        reason = f"{type(error).__name__}: {first_line(error)}"
        return Evaluation(metric, new, current, None, reason)
    return Evaluation(metric, new, current, champion)


def register(model_uri: str, name: str, tags: dict[str, str], description: str) -> int:
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=tags)
    MlflowClient().update_model_version(name, version.version, description=description)
    return int(version.version)


def apply_decision(
    client: MlflowClient, name: str, version: int, alias: str, decision: Decision
) -> str:
    """Moves `alias` (or `challenger`) to the version; returns the alias it set."""
    target = alias if decision.promote else CHALLENGER_ALIAS
    try:
        client.set_registered_model_alias(name, target, str(version))
    except Exception:
        # Never leave a version behind that no alias and no outcome speaks for.
        client.delete_model_version(name, str(version))
        raise
    return target


def explain_versions_without_alias(
    client: MlflowClient, name: str, uid: str, why: str, run_ids: set[str]
) -> list[int]:
    """Versions this TrainingRun registered from one of `run_ids` (parent runs whose train
    flow stopped) that hold no alias and say nothing about it get `why`: the flow stopped
    between registering and setting the alias. (An older version whose alias moved on to a
    newer one is not among them.)"""
    found = client.search_model_versions(f"name = '{name}' and tags.`{outcome.TAG_UID}` = '{uid}'")
    explained = []
    for version in found:
        if version.run_id not in run_ids:
            continue
        if not version.aliases and outcome.TAG_NO_ALIAS_REASON not in (version.tags or {}):
            client.set_model_version_tag(name, version.version, outcome.TAG_NO_ALIAS_REASON, why)
            explained.append(int(version.version))
    return explained
