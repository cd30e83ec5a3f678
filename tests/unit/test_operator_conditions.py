"""Status conditions: each transition gives a new list, and a condition's transition time
says since when it has had its status (what `kubectl wait` and users read)."""

from __future__ import annotations

import datetime as dt

from mlkube.operator.conditions import (
    MLFLOW_REACHABLE,
    drop_condition,
    find_condition,
    held_since,
    mlflow_answered,
    set_condition,
)

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)


def test_the_transition_time_moves_only_when_the_status_does() -> None:
    first = set_condition([], "Ready", "Unknown", "Deploying", "", NOW)
    same = set_condition(first, "Ready", "Unknown", "StillDeploying", "pods starting", LATER)
    assert held_since(same, "Ready", "Unknown") == NOW
    ready = find_condition(same, "Ready")
    assert ready is not None
    assert (ready.reason, ready.message) == ("StillDeploying", "pods starting")
    changed = set_condition(same, "Ready", "True", "Ready", "", LATER)
    assert held_since(changed, "Ready", "True") == LATER
    assert held_since(changed, "Ready", "Unknown") is None
    # The lists a reconcile read are left as they were.
    assert [c.status for c in first] == ["Unknown"] and len(changed) == 1


def test_dropping_and_mlflow_answers() -> None:
    conditions = set_condition([], "Ready", "True", "Ready", "", NOW)
    down = mlflow_answered(conditions, NOW, "Unreachable", "MLflow did not answer")
    reachable = find_condition(down, MLFLOW_REACHABLE)
    assert reachable is not None
    assert (reachable.status, reachable.reason, reachable.message) == (
        "False", "Unreachable", "MLflow did not answer",
    )  # fmt: skip
    up = mlflow_answered(down, LATER)
    assert held_since(up, MLFLOW_REACHABLE, "True") == LATER
    assert [c.type for c in drop_condition(up, "Ready")] == [MLFLOW_REACHABLE]
    assert find_condition(conditions, MLFLOW_REACHABLE) is None
