"""ModelDeployment rollout decisions: which version the InferenceService should pin, with
what canary share, and what the status says. Pure: the handler reads, this decides."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel

from mlkube.api.common import Condition
from mlkube.api.modeldeployment import CanaryStatus, ModelDeployment, ModelDeploymentStatus
from mlkube.operator.inferenceservice import client_endpoints
from mlkube.operator.settings import RAW_DEPLOYMENT_MODES
from mlkube.operator.status import (
    InferenceServiceView,
    drop_condition,
    find_condition,
    parse_timestamp,
    set_condition,
)

# ModelDeployment condition types.
READY = "Ready"
ROLLOUT = "RolledOut"
MODEL_RESOLVED = "ModelResolved"
CANARY_SUPPORTED = "CanarySupported"


class Event(BaseModel):
    """A Kubernetes Event to post on the ModelDeployment."""

    type: Literal["Normal", "Warning"] = "Normal"
    reason: str
    message: str


class Rollout(BaseModel):
    """The decision: the InferenceService to have (None: none yet) and the new status."""

    target_version: int | None
    canary_traffic_percent: int | None
    status: ModelDeploymentStatus
    events: list[Event] = []


def plan_rollout(
    deployment: ModelDeployment,
    previous: ModelDeploymentStatus,
    *,
    desired_version: int | None,
    isvc: InferenceServiceView | None,
    deployment_mode: str | None,
    now: dt.datetime,
    rollout_timeout_seconds: float = 600.0,
) -> Rollout:
    """One reconcile step.

    - First deployment: the desired version, no canary (there is nothing to split with).
    - The InferenceService's revision is ready: a canary is promoted (its share removed);
      without a split, the version is recorded as served.
    - Its revision failed, or is still not ready `rollout_timeout_seconds` after the
      rollout began (a pod that never becomes Ready fails nothing in raw mode: the old pods
      keep the Deployment available): back to the served version (traffic never left it),
      and the failed version is recorded so that it is not rolled out again.
    - The desired version differs from the pinned one: a rollout starts, as a canary when
      spec.canary asks for it, an earlier version serves and the mode supports it.
    """
    status = previous.model_copy(deep=True)
    events: list[Event] = []
    mode = (isvc.deployment_mode if isvc else None) or deployment_mode
    raw_mode = mode in RAW_DEPLOYMENT_MODES
    canary_spec = deployment.spec.canary
    if canary_spec is not None and raw_mode:
        status.conditions = set_condition(
            status.conditions, CANARY_SUPPORTED, "False", "RawDeployment",
            f"canaryTrafficPercent is not supported in KServe {mode} mode; "
            "new versions take all traffic at once", now,
        )  # fmt: skip
    elif canary_spec is not None:
        status.conditions = set_condition(
            status.conditions, CANARY_SUPPORTED, "True", "Supported", "", now
        )
    else:
        status.conditions = drop_condition(status.conditions, CANARY_SUPPORTED)

    if isvc is not None and _timed_out(status, isvc, rollout_timeout_seconds, now):
        isvc = isvc.model_copy(update={
            "state": "Failed", "reason": "RolloutTimedOut",
            "message": f"not ready {rollout_timeout_seconds:.0f} s after the rollout began",
        })  # fmt: skip
    if isvc is None:
        target, canary = desired_version, None
        if target is not None:
            status.phase = "Progressing"
            events.append(Event(reason="RolloutStarted", message=f"deploying version {target}"))
            status.conditions = _rollout_condition(status, "Unknown", "Deploying", now)
    else:
        status.url = isvc.url
        status.predict_url, status.grpc_address = client_endpoints(
            isvc.url, deployment.spec.model.name, deployment.spec.protocol, raw_mode
        )
        target, canary = isvc.version, isvc.canary_traffic_percent
        served = status.served_version
        if isvc.state == "Ready" and target is not None and canary is not None:
            # The canary's revision is ready: promote it (drop the split). It counts as
            # served once the InferenceService is ready without the split.
            canary = None
            events.append(Event(
                reason="CanaryPromoted",
                message=f"version {target} is ready; it now takes all traffic",
            ))  # fmt: skip
            status.phase = "Progressing"
            status.conditions = set_condition(status.conditions, READY, "True", "Ready", "", now)
        elif isvc.state == "Ready" and target is not None:
            if served != target:
                status.previous_version = served
                status.served_version = target
                events.append(Event(reason="RolledOut", message=f"serving version {target}"))
            status.canary = None
            status.phase = "Ready"
            status.conditions = set_condition(status.conditions, READY, "True", "Ready", "", now)
            if desired_version is None or desired_version != status.failed_version:
                status.message = None
                status.conditions = _rollout_condition(status, "True", "RolledOut", now)
            # else: serving the previous version after a failed one; the status keeps why.
        elif isvc.state == "Failed" and target is not None:
            why = f"version {target} failed ({isvc.reason}): {isvc.message}".rstrip(": ")
            status.failed_version = target
            status.canary = None
            if served is not None and served != target:
                message = f"{why}; traffic stays on version {served}"
                events.append(Event(type="Warning", reason="RolloutFailed", message=message))
                target, canary = served, None
                status.phase = "Progressing"
            else:
                message = why
                if status.phase != "Failed":
                    events.append(Event(type="Warning", reason="RolloutFailed", message=message))
                status.phase = "Failed"
                status.conditions = set_condition(
                    status.conditions, READY, "False", isvc.reason or "Failed", message, now
                )
            status.message = message
            status.conditions = _rollout_condition(status, "False", "RevisionFailed", now, message)
        else:
            # The old version keeps serving while a new one comes up.
            status.phase = "Ready" if served is not None and served == target else "Progressing"
            if served is None:
                status.conditions = set_condition(
                    status.conditions, READY, "Unknown", isvc.reason or "Progressing",
                    isvc.message, now,
                )  # fmt: skip

    if (
        desired_version is not None
        and target is not None
        and desired_version != target
        and desired_version != status.failed_version
    ):
        served = status.served_version
        use_canary = (
            canary_spec is not None
            and not raw_mode
            and served is not None
            and deployment.spec.model.followed_alias is not None  # a pinned rollback is whole
            and canary_spec.traffic_percent < 100
        )
        target = desired_version
        canary = canary_spec.traffic_percent if use_canary and canary_spec else None
        status.canary = (
            CanaryStatus(version=target, traffic_percent=canary) if canary is not None else None
        )
        status.phase = "Progressing"
        status.message = None
        share = f" as a canary with {canary}% of traffic" if canary is not None else ""
        events.append(
            Event(reason="RolloutStarted", message=f"rolling out version {target}{share}")
        )
        status.conditions = _rollout_condition(status, "Unknown", "RollingOut", now)
    return Rollout(
        target_version=target, canary_traffic_percent=canary, status=status, events=events
    )


def refused_deployment_status(
    previous: ModelDeploymentStatus, reason: str, message: str, now: dt.datetime
) -> ModelDeploymentStatus:
    """A ModelDeployment the operator will not act on (its spec asks for something the
    admin does not allow): Failed, with the reason; its InferenceService is left as is."""
    status = previous.model_copy(deep=True)
    status.phase = "Failed"
    status.message = message
    status.conditions = set_condition(
        status.conditions, MODEL_RESOLVED, "False", reason, message, now
    )
    status.conditions = set_condition(status.conditions, READY, "False", reason, message, now)
    return status


def _timed_out(
    status: ModelDeploymentStatus, isvc: InferenceServiceView, timeout: float, now: dt.datetime
) -> bool:
    """A rollout of a new version that has been waiting for readiness longer than allowed."""
    if isvc.state != "Progressing" or isvc.version is None:
        return False
    if isvc.version == status.served_version:
        return False
    began = find_condition(status.conditions, ROLLOUT)
    since = parse_timestamp(began.last_transition_time) if began is not None else None
    if began is None or began.status != "Unknown" or since is None:
        return False
    return (now - since).total_seconds() > timeout


def _rollout_condition(
    status: ModelDeploymentStatus,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    now: dt.datetime,
    message: str = "",
) -> list[Condition]:
    return set_condition(status.conditions, ROLLOUT, value, reason, message, now)
