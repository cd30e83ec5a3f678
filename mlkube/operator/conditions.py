"""Status conditions, as both custom resources keep them. Pure.

A list of conditions is never changed in place: each transition below returns a new list
(the shape of kopf's handler progression, a state replaced by small named steps), so the
status a reconcile started from stays what it read.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from mlkube.api.common import Condition

ConditionStatus = Literal["True", "False", "Unknown"]

# Both resources: whether the MLflow they name answers.
MLFLOW_REACHABLE = "MlflowReachable"


def timestamp(moment: dt.datetime) -> str:
    """RFC 3339 UTC at second precision, as Kubernetes writes metav1.Time."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def find_condition(conditions: list[Condition], kind: str) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def held_since(
    conditions: list[Condition], kind: str, status: ConditionStatus
) -> dt.datetime | None:
    """When condition `kind` took `status`, if it has that status now."""
    found = find_condition(conditions, kind)
    if found is None or found.status != status:
        return None
    return parse_timestamp(found.last_transition_time)


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: dt.datetime,
) -> list[Condition]:
    """Conditions with `kind` set; lastTransitionTime moves only when the status does."""
    old = find_condition(conditions, kind)
    kept = old.last_transition_time if old is not None and old.status == status else None
    new = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=kept or timestamp(now),
    )
    return [*(c for c in conditions if c.type != kind), new]


def drop_condition(conditions: list[Condition], kind: str) -> list[Condition]:
    return [c for c in conditions if c.type != kind]


def mlflow_answered(
    conditions: list[Condition], now: dt.datetime, error_reason: str | None = None,
    error_message: str = "",
) -> list[Condition]:  # fmt: skip
    """MlflowReachable after a call to MLflow: True, or False with our reason and words
    (never what the server said)."""
    if error_reason is None:
        return set_condition(conditions, MLFLOW_REACHABLE, "True", "Reachable", "", now)
    return set_condition(conditions, MLFLOW_REACHABLE, "False", error_reason, error_message, now)
