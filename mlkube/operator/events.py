"""The Kubernetes Events a reconcile posts on its object, and those that follow from a
change of MLflow's reachability (both resources). Pure."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from mlkube.api.common import Condition
from mlkube.operator.conditions import MLFLOW_REACHABLE, find_condition


class Event(BaseModel):
    """A Kubernetes Event to post on a TrainingRun or ModelDeployment."""

    type: Literal["Normal", "Warning"] = "Normal"
    reason: str
    message: str


def mlflow_events(before: list[Condition], after: list[Condition]) -> list[Event]:
    """A warning when MLflow stops answering (or answers differently wrong), a note when
    it answers again; nothing while it stays as it was."""
    old, new = find_condition(before, MLFLOW_REACHABLE), find_condition(after, MLFLOW_REACHABLE)
    if new is None or (old is not None and old.status == new.status):
        return []
    if new.status == "False":
        return [Event(type="Warning", reason=f"Mlflow{new.reason}", message=new.message)]
    if old is not None:
        return [Event(reason="MlflowReachable", message="MLflow answers again")]
    return []
