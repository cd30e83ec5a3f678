"""The record a train flow leaves on its MLflow parent run, and how to read it back.

MLflow is the single source of truth: the flow writes these tags while it runs and when it
ends; the operator reads them into the TrainingRun status. Pure: no MLflow import here, so
the operator can use it without the training stack.
"""

from __future__ import annotations

import json
from typing import Literal

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
# Standard MLflow tag that makes a run a child of another.
TAG_PARENT_RUN = "mlflow.parentRunId"

RunState = Literal["RUNNING", "FINISHED", "FAILED", "KILLED", "SCHEDULED"]


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

    @property
    def finished(self) -> bool:
        return self.state in ("FINISHED", "FAILED", "KILLED")


def outcome_from_tags(run_id: str, state: str, tags: dict[str, str]) -> Outcome:
    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    params = json.loads(tags.get(TAG_BEST_PARAMS, "{}"))
    version = tags.get(TAG_MODEL_VERSION)
    promoted = tags.get(TAG_PROMOTED)
    return Outcome(
        run_id=run_id,
        state=state,  # type: ignore[arg-type]
        trials_completed=int(tags.get(TAG_TRIALS_COMPLETED, 0)),
        trials_total=int(tags.get(TAG_TRIALS_TOTAL, 0)),
        best_metric=tags.get(TAG_BEST_METRIC),
        best_value=number(TAG_BEST_VALUE),
        best_params={k: str(v) for k, v in params.items()},
        holdout_value=number(TAG_HOLDOUT_VALUE),
        model_version=int(version) if version else None,
        promoted=None if promoted is None else promoted == "true",
        reason=tags.get(TAG_PROMOTION_REASON),
        error=tags.get(TAG_ERROR),
    )


def trainingrun_filter(uid: str) -> str:
    """MLflow search filter for the parent run of one TrainingRun."""
    return f"tags.`{TAG_UID}` = '{uid}' and tags.`{TAG_ROLE}` = 'parent'"
