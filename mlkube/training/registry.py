"""MLflow registration and the promotion gate: the alias moves only to a better model.

The gate is not check-then-set: MLflow has no compare-and-set for aliases, so just before it
moves the alias the gate reads it again and, when another run moved it meanwhile, scores
the new champion on the same held-out data and decides again (`run_gate`). What is left
is the time between that last read and the write (two requests); in local mode a file lock
per model closes it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlkube.api.errors import first_line
from mlkube.api.registered_model import CHALLENGER_ALIAS, model_uri
from mlkube.local import is_local_store, mlkube_home
from mlkube.training import outcome
from mlkube.training.ownership import TAG_OWNER, ModelNotOwned, ownership_refusal
from mlkube.training.tasks.base import Mode, Task, TaskData

# How often the gate decides again when the alias keeps moving under it, before it gives up
# and promotes nothing.
MAX_GATE_ROUNDS = 5


class ChampionUnreadable(Exception):
    """The champion could not be fetched from MLflow (connection error, timeout, 5xx, a
    refusal, missing files): nothing is known about how good it is."""


@dataclass(frozen=True)
class Evaluation:
    """The new model and the current champion, scored on the same held-out data."""

    metric: str
    new: dict[str, float]
    champion_version: int | None
    champion: dict[str, float] | None
    champion_error: str | None = None
    # True: the champion could not be read (champion_error says why); False with an error:
    # it was read but does not load or score on this data (another shape).
    champion_unreadable: bool = False


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
    """The promotion gate: strictly better than the champion, by at least min_improvement.
    A score that is not a finite number never wins: a new model's is never promoted, and a
    champion's is beaten by any finite one."""
    metric = evaluation.metric
    new = evaluation.new[metric]
    version = evaluation.champion_version
    if not enabled:
        return Decision(False, "promotion is disabled for this TrainingRun")
    if not math.isfinite(new):
        return Decision(False, f"{metric} is {new} on the held-out data, not a finite number")
    if version is None:
        return Decision(True, "no current champion to beat")
    if evaluation.champion is None and evaluation.champion_unreadable:
        return Decision(
            False,
            f"champion v{version} could not be read from MLflow to score it "
            f"({evaluation.champion_error}); nothing is promoted until it can be",
        )
    if evaluation.champion is None:
        return Decision(
            True,
            f"champion v{version} could not be scored on this held-out data "
            f"({evaluation.champion_error})",
        )
    champion = evaluation.champion[metric]
    if not math.isfinite(champion):
        return Decision(
            True, f"better: champion v{version} scores {metric} {champion} on the same held-out "
            f"data, the new model {new:.6g}",
        )  # fmt: skip
    gain = relative_gain(new, champion, mode)
    comparison = (
        f"{metric} {new:.6g} vs champion v{version} {champion:.6g} "
        f"on the same held-out data ({gain:+.2%}; needed > 0 and >= {min_improvement:.2%})"
    )
    if gain > 0 and gain >= min_improvement:
        return Decision(True, f"better: {comparison}")
    return Decision(False, f"not better: {comparison}")


def version_by_alias(client: MlflowClient, name: str, alias: str) -> int | None:
    """The version `alias` points at; None when the model or the alias does not exist. Any
    other failure (MLflow down) raises: an unknown champion must not count as none."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in outcome.MLFLOW_MISSING_CODES:
            return None
        raise


def score_version(task: Task, data: TaskData, name: str, version: int) -> dict[str, float]:
    """`task`'s metrics of a registered version on `data`.

    Fetching and using are told apart: anything that fails while the version's files are
    fetched from MLflow (connection errors, timeouts, 5xx, refusals, missing files) raises
    ChampionUnreadable, as nothing is known about the model; anything that fails once the
    files are here (they do not load in this environment, or the model does not take this
    data: another shape) propagates as it is: that model cannot be compared here at all.
    """
    import mlflow.artifacts
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="mlkube-champion-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri(name, version=version), dst_path=tmp
            )
        except Exception as error:
            raise ChampionUnreadable(f"{type(error).__name__}: {first_line(error)}") from error
        if not (Path(local) / "MLmodel").is_file():
            # MLflow lists what is there: a version whose files are gone downloads as nothing.
            raise ChampionUnreadable("its files are not in MLflow's artifact store (no MLmodel)")
        return task.evaluate(mlflow.pyfunc.load_model(local), data)


Scorer = Callable[[int], dict[str, float]]


def champion_evaluation(
    metric: str, new: dict[str, float], version: int | None, score: Scorer
) -> Evaluation:
    """The new model's scores against the champion `version`, scored with `score`."""
    if version is None:
        return Evaluation(metric, new, None, None)
    try:
        champion = score(version)
    except ChampionUnreadable as error:
        return Evaluation(metric, new, version, None, str(error), champion_unreadable=True)
    except Exception as error:  # read, but of another shape: it must not block a new model
        reason = f"{type(error).__name__}: {first_line(error)}"
        return Evaluation(metric, new, version, None, reason)
    return Evaluation(metric, new, version, champion)


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
    return champion_evaluation(
        metric, new, current, lambda version: score_version(task, data, name, version)
    )


# --------------------------------------------------------------------------- ownership


def model_owner(client: MlflowClient, name: str) -> tuple[bool, str | None]:
    """(registered, owner namespace or None)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code in outcome.MLFLOW_MISSING_CODES:
            return False, None
        raise
    return True, dict(model.tags or {}).get(TAG_OWNER)


def check_owner(client: MlflowClient, name: str, namespace: str, shared: bool) -> None:
    """Raises ModelNotOwned (one line naming the owner) unless `namespace` may register and
    promote versions of `name`; a model nobody registered yet, or without an owner, is free."""
    registered, owner = model_owner(client, name)
    refusal = ownership_refusal(
        name, owner, namespace, shared=shared, registered=registered and owner is not None
    )
    if refusal:
        raise ModelNotOwned(refusal)


def claim(client: MlflowClient, name: str, namespace: str, shared: bool) -> None:
    """Makes `namespace` the owner of `name` if nobody is (creating the registered model
    with its owner tag is atomic: MLflow refuses a second create), then checks as
    check_owner does."""
    try:
        client.create_registered_model(name, tags={TAG_OWNER: namespace})
        return
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if model_owner(client, name)[1] is None:
        # Registered before owners were recorded (or by hand): the first to register a
        # version with mlkube owns it from now on.
        client.set_registered_model_tag(name, TAG_OWNER, namespace)
    check_owner(client, name, namespace, shared)


def register(model_uri: str, name: str, tags: dict[str, str], description: str) -> int:
    import mlflow

    version = mlflow.register_model(model_uri, name, tags=tags)
    MlflowClient().update_model_version(name, version.version, description=description)
    return int(version.version)


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateResult:
    decision: Decision
    alias: str  # the alias set on the new version: the promotion alias or challenger
    evaluation: Evaluation  # against the champion the final decision was made against


def run_gate(
    evaluation: Evaluation,
    decide_on: Callable[[Evaluation], Decision],
    *,
    read_alias: Callable[[], int | None],
    score: Scorer,
    move_alias: Callable[[str], None],
    alias: str,
    hold: Callable[[], None] = lambda: None,
    serialized: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
    max_rounds: int = MAX_GATE_ROUNDS,
) -> GateResult:
    """Decide on `evaluation`, then move `alias` (promoted) or challenger to the new version.

    Just before the move the alias is read again: if another run moved it since
    `evaluation` was made, the new champion is scored with `score` (the same held-out data)
    and the gate decides again, and reads again. `hold` runs between the first decision and
    that re-read (tests use it to force two gates to interleave); from the re-read to the
    move, the gate runs inside `serialized()` (a lock, in local mode).
    """
    decision = decide_on(evaluation)
    hold()
    with serialized():
        return _reread_and_move(evaluation, decision, decide_on, read_alias, score, move_alias,
                                alias, max_rounds)  # fmt: skip


def _reread_and_move(
    evaluation: Evaluation,
    decision: Decision,
    decide_on: Callable[[Evaluation], Decision],
    read_alias: Callable[[], int | None],
    score: Scorer,
    move_alias: Callable[[str], None],
    alias: str,
    max_rounds: int,
) -> GateResult:
    for _ in range(max_rounds):
        current = read_alias()
        if current == evaluation.champion_version:
            target = alias if decision.promote else CHALLENGER_ALIAS
            move_alias(target)
            return GateResult(decision, target, evaluation)
        evaluation = champion_evaluation(evaluation.metric, evaluation.new, current, score)
        decided = decide_on(evaluation)
        decision = replace(decided, reason=f"{decided.reason} (champion moved to v{current} "
                                              "while this run was deciding)")  # fmt: skip
    decision = Decision(
        False, f"the {alias} alias moved {max_rounds} times while this run was deciding; "
        "nothing is promoted",
    )  # fmt: skip
    move_alias(CHALLENGER_ALIAS)
    return GateResult(decision, CHALLENGER_ALIAS, evaluation)


@contextlib.contextmanager
def gate_lock(tracking_uri: str, name: str) -> Iterator[None]:
    """In local mode, one gate per model at a time on this machine (a file lock beside the
    local store); with a tracking server, no lock (gates run in many pods)."""
    if not is_local_store(tracking_uri):
        yield
        return
    folder = mlkube_home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    with open(Path(folder) / f"gate-{safe}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(
    client: MlflowClient,
    tracking_uri: str,
    evaluation: Evaluation,
    decide_on: Callable[[Evaluation], Decision],
    score: Scorer,
    *,
    name: str,
    version: int,
    alias: str,
    namespace: str,
    shared: bool,
    hold: Callable[[], None] = lambda: None,
) -> GateResult:
    """The gate on the registered `version`: ownership checked again, the alias re-read and
    moved (run_gate), the version's description set to the final reason. Whatever fails,
    the version does not stay behind without an alias or an outcome: it is deleted."""

    def move(target: str) -> None:
        client.set_registered_model_alias(name, target, str(version))

    try:
        check_owner(client, name, namespace, shared)
        result = run_gate(
            evaluation, decide_on,
            read_alias=lambda: version_by_alias(client, name, alias),
            score=score, move_alias=move, alias=alias, hold=hold,
            serialized=lambda: gate_lock(tracking_uri, name),
        )  # fmt: skip
        client.update_model_version(name, str(version), description=result.decision.reason)
    except BaseException:
        # Never leave a version behind that no alias and no outcome speaks for.
        with contextlib.suppress(Exception):
            client.delete_model_version(name, str(version))
        raise
    return result


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
