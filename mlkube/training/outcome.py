"""The record a train flow leaves on its MLflow parent run, and how to read it back.

MLflow is the single source of truth: the flow writes these tags while it runs and when it
ends; the operator reads them into the TrainingRun status. Pure: no MLflow import here, so
the operator can use it without the training stack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Literal, TypeVar, get_args

from pydantic import BaseModel

TAG_UID = "mlkube.trainingrun.uid"
TAG_NAME = "mlkube.trainingrun.name"
TAG_NAMESPACE = "mlkube.trainingrun.namespace"
TAG_TASK = "mlkube.task"
TAG_TRIALS_TOTAL = "mlkube.trials.total"
TAG_TRIALS_COMPLETED = "mlkube.trials.completed"
TAG_BEST_METRIC = "mlkube.best.metric"
TAG_BEST_VALUE = "mlkube.best.value"
TAG_BEST_PARAMS = "mlkube.best.params"
TAG_HOLDOUT_VALUE = "mlkube.holdout.value"
TAG_MODEL_NAME = "mlkube.model.name"
TAG_MODEL_VERSION = "mlkube.model.version"
TAG_PROMOTED = "mlkube.promoted"
TAG_PROMOTION_REASON = "mlkube.promotion.reason"
TAG_ERROR = "mlkube.error"
# On a model version that never got its alias: why (its train flow stopped in between).
TAG_NO_ALIAS_REASON = "mlkube.noAlias.reason"
# "parent" on the TrainingRun's run, "trial" on each nested trial run.
TAG_ROLE = "mlkube.role"
# On a trial run: Tune's id of the trial (a resumed search finds its runs by it).
TAG_TRIAL_ID = "mlkube.trial.id"
# On a parent run: a digest of the spec its search ran; a new attempt resumes the search
# only for the same spec.
TAG_SPEC_DIGEST = "mlkube.spec.digest"
# On a parent run: how many times its search was resumed after its driver died.
TAG_RESUMED = "mlkube.resumed"
# Standard MLflow tag that makes a run a child of another.
TAG_PARENT_RUN = "mlflow.parentRunId"
# MLflow's error codes that mean "does not exist" (MLflow 3 answers a missing alias of an
# existing model with INVALID_PARAMETER_VALUE, HTTP 400): an answer, not an outage.
MLFLOW_MISSING_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})

RunState = Literal["RUNNING", "FINISHED", "FAILED", "KILLED", "SCHEDULED"]
Parsed = TypeVar("Parsed")


class Outcome(BaseModel):
    """What a TrainingRun's parent run says so far."""

    run_id: str
    state: RunState
    trials_completed: int = 0
    trials_total: int = 0
    best_metric: str | None = None
    best_value: float | None = None
    best_params: dict[str, str] = {}
    holdout_value: float | None = None
    model_version: int | None = None
    promoted: bool | None = None
    reason: str | None = None
    error: str | None = None
    # Tags whose values did not parse (they are left out above).
    unreadable_tags: list[str] = []

    @property
    def finished(self) -> bool:
        return self.state in ("FINISHED", "FAILED", "KILLED")


RUN_STATES: frozenset[str] = frozenset(get_args(RunState))


def _int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # NaN and inf do not survive a JSON status patch
        raise ValueError(text)
    return value


def _params(text: str) -> dict[str, str]:
    params = json.loads(text)
    if not isinstance(params, dict):
        raise ValueError(text)
    return {str(k): str(v) for k, v in params.items()}


def _promoted(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def outcome_from_tags(run_id: str, state: str, tags: dict[str, str]) -> Outcome:
    """The outcome the tags record. Anyone who can write to the MLflow can write these
    tags: a value that does not parse is left out and its tag named in
    `unreadable_tags`, never raised."""
    unreadable: list[str] = []

    def read(key: str, parse: Callable[[str], Parsed]) -> Parsed | None:
        if key not in tags:
            return None
        try:
            return parse(tags[key])
        except (ValueError, TypeError, RecursionError):
            unreadable.append(key)
            return None

    known_state = state if state in RUN_STATES else "RUNNING"
    if known_state != state:
        unreadable.append("status")
    version = read(TAG_MODEL_VERSION, _int) if tags.get(TAG_MODEL_VERSION) else None
    return Outcome(
        run_id=run_id,
        state=known_state,  # type: ignore[arg-type]
        trials_completed=read(TAG_TRIALS_COMPLETED, _int) or 0,
        trials_total=read(TAG_TRIALS_TOTAL, _int) or 0,
        best_metric=tags.get(TAG_BEST_METRIC),
        best_value=read(TAG_BEST_VALUE, _float),
        best_params=read(TAG_BEST_PARAMS, _params) or {},
        holdout_value=read(TAG_HOLDOUT_VALUE, _float),
        model_version=version,
        promoted=read(TAG_PROMOTED, _promoted),
        reason=tags.get(TAG_PROMOTION_REASON),
        error=tags.get(TAG_ERROR),
        unreadable_tags=unreadable,
    )


def trainingrun_filter(uid: str, namespace: str) -> str:
    """MLflow search filter for the parent run of one TrainingRun: its uid and namespace
    (Kubernetes values: no quotes in them)."""
    return (
        f"tags.`{TAG_UID}` = '{uid}' and tags.`{TAG_NAMESPACE}` = '{namespace}'"
        f" and tags.`{TAG_ROLE}` = 'parent'"
    )


def belongs_to(tags: dict[str, str], uid: str, namespace: str) -> bool:
    """The run is the parent run of this TrainingRun (the same test as the filter)."""
    return (
        tags.get(TAG_UID) == uid
        and tags.get(TAG_NAMESPACE) == namespace
        and tags.get(TAG_ROLE) == "parent"
    )
