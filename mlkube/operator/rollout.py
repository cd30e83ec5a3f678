"""ModelDeployment rollout decisions: which version the InferenceService should pin, with
what canary share, and what the status says. Pure: the handler reads, this decides.

The version comes from following the model (follow_model): the alias resolved and the
model's owner checked through MLflow, at most every poll interval, remembered in between
(DeploymentMemo). The MLflow reader is handed in; nothing else here does I/O.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from mlkube.api.common import Condition
from mlkube.api.modeldeployment import (
    CanaryStatus,
    ModelDeployment,
    ModelDeploymentStatus,
    ModelSelector,
)
from mlkube.api.registered_model import DEFAULT_ALIAS
from mlkube.operator.conditions import (
    drop_condition,
    held_since,
    mlflow_answered,
    set_condition,
)
from mlkube.operator.events import Event
from mlkube.operator.inferenceservice import MODEL_PLACEHOLDER, client_endpoints
from mlkube.operator.mlflow_reader import MlflowError, MlflowReader
from mlkube.operator.settings import is_raw_mode
from mlkube.operator.status import InferenceServiceView
from mlkube.training.ownership import FIELD, ownership_refusal

# ModelDeployment condition types.
READY = "Ready"
ROLLOUT = "RolledOut"
MODEL_RESOLVED = "ModelResolved"
CANARY_SUPPORTED = "CanarySupported"


class Rollout(BaseModel):
    """The decision: the InferenceService to have (None: none yet) and the new status."""

    target_version: int | None
    canary_traffic_percent: int | None = None
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
    """One reconcile step: what the InferenceService says decides the case, then a new
    desired version may start a rollout.

    - First deployment: the desired version, no canary (there is nothing to split with).
    - The InferenceService's revision is ready: a canary is promoted (its share removed);
      without a split, the version is recorded as served.
    - Its revision failed, or is still not ready `rollout_timeout_seconds` after the
      rollout began (a pod that never becomes Ready fails nothing in raw mode: the old pods
      keep the Deployment available): back to the served version (traffic never left it),
      and the failed version is recorded so that it is not rolled out again.
    - Otherwise it is on its way: the served version keeps serving meanwhile.
    - The desired version differs from the pinned one: a rollout starts, as a canary when
      spec.canary asks for it, an earlier version serves and the mode supports it.
    """
    status = previous.model_copy(deep=True)
    status.models, status.models_ready = [], None  # what spec.models said, if it did
    if isvc is not None and isvc.version is None and isvc.model_versions is not None:
        isvc = None  # it served several models (the spec changed): deploy this one afresh
    mode = (isvc.deployment_mode if isvc else None) or deployment_mode
    status.conditions = _canary_support(status.conditions, deployment, mode, now)
    if isvc is not None and _timed_out(status, isvc, rollout_timeout_seconds, now):
        isvc = isvc.model_copy(update={
            "state": "Failed", "reason": "RolloutTimedOut",
            "message": f"not ready {rollout_timeout_seconds:.0f} s after the rollout began",
        })  # fmt: skip
    if isvc is None:
        step = _first_deployment(status, desired_version, now)
    else:
        status.url = isvc.url
        status.predict_url, status.grpc_address = endpoints(deployment, isvc.url, mode)
        if isvc.state == "Ready" and isvc.version is not None:
            if isvc.canary_traffic_percent is not None:
                step = _canary_ready(status, isvc.version, now)
            else:
                step = _revision_ready(status, isvc.version, desired_version, now)
        elif isvc.state == "Failed" and isvc.version is not None:
            step = _revision_failed(status, isvc, isvc.version, now)
        else:
            step = _on_its_way(status, isvc, now)
    if desired_version is not None and _rollout_wanted(step, desired_version):
        step = _start_rollout(step, deployment, desired_version, is_raw_mode(mode), now)
    return step


def endpoints(
    deployment: ModelDeployment, url: str | None, mode: str | None
) -> tuple[str | None, str | None]:
    """status.predictUrl and grpcAddress; with several models the URL has a placeholder
    for the model's name."""
    model = deployment.spec.model
    name = model.name if model is not None else MODEL_PLACEHOLDER
    return client_endpoints(url, name, deployment.spec.protocol, is_raw_mode(mode))


def _canary_support(
    conditions: list[Condition], deployment: ModelDeployment, mode: str | None, now: dt.datetime
) -> list[Condition]:
    """CanarySupported: False in KServe's raw modes, True otherwise; absent without a canary."""
    if deployment.spec.canary is None:
        return drop_condition(conditions, CANARY_SUPPORTED)
    if is_raw_mode(mode):
        return set_condition(
            conditions, CANARY_SUPPORTED, "False", "RawDeployment",
            f"canaryTrafficPercent is not supported in KServe {mode} mode; "
            "new versions take all traffic at once", now,
        )  # fmt: skip
    return set_condition(conditions, CANARY_SUPPORTED, "True", "Supported", "", now)


def _first_deployment(
    status: ModelDeploymentStatus, desired: int | None, now: dt.datetime
) -> Rollout:
    """No InferenceService yet: the desired version, whole (None: nothing to deploy yet)."""
    events = []
    if desired is not None:
        status.phase = "Progressing"
        events.append(Event(reason="RolloutStarted", message=f"deploying version {desired}"))
        status.conditions = _rollout_condition(status, "Unknown", "Deploying", now)
    return Rollout(target_version=desired, status=status, events=events)


def _canary_ready(status: ModelDeploymentStatus, version: int, now: dt.datetime) -> Rollout:
    """The canary's revision is ready: promote it (drop the split). It counts as served once
    the InferenceService is ready without the split."""
    status.phase = "Progressing"
    status.conditions = set_condition(status.conditions, READY, "True", "Ready", "", now)
    promoted = Event(
        reason="CanaryPromoted", message=f"version {version} is ready; it now takes all traffic"
    )
    return Rollout(target_version=version, status=status, events=[promoted])


def _revision_ready(
    status: ModelDeploymentStatus, version: int, desired: int | None, now: dt.datetime
) -> Rollout:
    """The pinned version serves all traffic: recorded as served."""
    events = []
    if status.served_version != version:
        status.previous_version = status.served_version
        status.served_version = version
        events.append(Event(reason="RolledOut", message=f"serving version {version}"))
    status.canary = None
    status.phase = "Ready"
    status.conditions = set_condition(status.conditions, READY, "True", "Ready", "", now)
    if desired is None or desired != status.failed_version:
        status.message = None
        status.conditions = _rollout_condition(status, "True", "RolledOut", now)
    # else: serving the previous version after a failed one; the status keeps why.
    return Rollout(target_version=version, status=status, events=events)


def _revision_failed(
    status: ModelDeploymentStatus, isvc: InferenceServiceView, version: int, now: dt.datetime
) -> Rollout:
    """The pinned version failed: back to the served one if there is one, else Failed."""
    why = f"version {version} failed ({isvc.reason}): {isvc.message}".rstrip(": ")
    status.failed_version = version
    status.canary = None
    served, events, target = status.served_version, [], version
    if served is not None and served != version:
        message = f"{why}; traffic stays on version {served}"
        events.append(Event(type="Warning", reason="RolloutFailed", message=message))
        target = served
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
    return Rollout(target_version=target, status=status, events=events)


def _on_its_way(
    status: ModelDeploymentStatus, isvc: InferenceServiceView, now: dt.datetime
) -> Rollout:
    """Neither ready nor failed: the old version keeps serving while the new one comes up."""
    served = status.served_version
    status.phase = "Ready" if served is not None and served == isvc.version else "Progressing"
    if served is None:
        status.conditions = set_condition(
            status.conditions, READY, "Unknown", isvc.reason or "Progressing", isvc.message, now
        )
    return Rollout(
        target_version=isvc.version, canary_traffic_percent=isvc.canary_traffic_percent,
        status=status,
    )  # fmt: skip


def _rollout_wanted(step: Rollout, desired: int) -> bool:
    """The desired version is not the one pinned (if any is), and has not failed before."""
    return (
        step.target_version is not None
        and desired != step.target_version
        and desired != step.status.failed_version
    )


def _start_rollout(
    step: Rollout, deployment: ModelDeployment, desired: int, raw_mode: bool, now: dt.datetime
) -> Rollout:
    """Roll `desired` out: as a canary when spec.canary asks for one, a version serves to
    split with, the mode can split traffic and the version follows an alias (a pinned
    rollback is whole)."""
    status, canary_spec = step.status, deployment.spec.canary
    use_canary = (
        canary_spec is not None
        and not raw_mode
        and status.served_version is not None
        and deployment.spec.model is not None
        and deployment.spec.model.followed_alias is not None
        and canary_spec.traffic_percent < 100
    )
    canary = canary_spec.traffic_percent if use_canary and canary_spec else None
    status.canary = (
        CanaryStatus(version=desired, traffic_percent=canary) if canary is not None else None
    )
    status.phase = "Progressing"
    status.message = None
    share = f" as a canary with {canary}% of traffic" if canary is not None else ""
    started = Event(reason="RolloutStarted", message=f"rolling out version {desired}{share}")
    status.conditions = _rollout_condition(status, "Unknown", "RollingOut", now)
    return Rollout(
        target_version=desired, canary_traffic_percent=canary, status=status,
        events=[*step.events, started],
    )  # fmt: skip


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
    began = held_since(status.conditions, ROLLOUT, "Unknown")
    return began is not None and (now - began).total_seconds() > timeout


def _rollout_condition(
    status: ModelDeploymentStatus,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    now: dt.datetime,
    message: str = "",
) -> list[Condition]:
    return set_condition(status.conditions, ROLLOUT, value, reason, message, now)


# --------------------------------------------------------------------------- following the model


@dataclass
class DeploymentMemo:
    """What MLflow last said about one ModelDeployment, and when: the version its alias
    pointed at and whether its namespace may serve the model. Kept between reconciles (in
    memory), so that MLflow is asked at most every poll interval, or at once when forced
    (the spec changed)."""

    alias: str | None = None
    alias_version: int | None = None
    alias_checked_at: dt.datetime | None = None
    owner_model: str | None = None
    owner_refusal: str | None = None
    owner_checked_at: dt.datetime | None = None
    # spec.models: the same, per model name
    models: dict[str, DeploymentMemo] = field(default_factory=dict)


class Followed(BaseModel):
    """What following the model found: a refusal (the namespace may not serve it), or the
    version to serve (None: unknown, which leaves the InferenceService as it is)."""

    refusal: str | None = None
    version: int | None = None
    conditions: list[Condition]


def _checked_recently(at: dt.datetime | None, now: dt.datetime, poll_seconds: float) -> bool:
    return at is not None and (now - at).total_seconds() < poll_seconds


def check_ownership(
    model: str, namespace: str, reader: MlflowReader, memo: DeploymentMemo,
    conditions: list[Condition], *, now: dt.datetime, poll_seconds: float, shared: bool,
    force: bool, where: str = FIELD,
) -> tuple[str | None, bool, list[Condition]]:  # fmt: skip
    """Whether `namespace` may serve the model: (refusal message or None, known, the
    conditions). Unknown (MLflow not answering) rolls nothing out; with `shared` (the
    operator's allowSharedModels) every namespace may, and MLflow is not asked."""
    if shared:
        return None, True, conditions
    fresh = _checked_recently(memo.owner_checked_at, now, poll_seconds)
    if not force and fresh and memo.owner_model == model:
        return memo.owner_refusal, True, conditions
    try:
        ownership = reader.model_ownership(model)
    except MlflowError as error:
        return None, False, mlflow_answered(conditions, now, error.reason, error.message)
    refusal = ownership_refusal(
        model, ownership.owner, namespace, shared=False, registered=ownership.registered,
        field=where,
    )  # fmt: skip
    memo.owner_checked_at, memo.owner_model, memo.owner_refusal = now, model, refusal
    return refusal, True, mlflow_answered(conditions, now)


def desired_version(
    selector: ModelSelector, reader: MlflowReader, memo: DeploymentMemo,
    conditions: list[Condition], *, now: dt.datetime, poll_seconds: float, force: bool,
) -> tuple[int | None, list[Condition]]:  # fmt: skip
    """The version to serve: pinned, or the alias resolved through MLflow (None when
    unknown; while MLflow does not answer, the version it last said)."""
    if selector.version is not None:
        conditions = set_condition(conditions, MODEL_RESOLVED, "True", "Pinned", "", now)
        return selector.version, conditions
    alias = selector.followed_alias or DEFAULT_ALIAS
    fresh = _checked_recently(memo.alias_checked_at, now, poll_seconds)
    if not force and fresh and memo.alias == alias:
        return memo.alias_version, conditions
    try:
        version = reader.resolve_alias(selector.name, alias)
    except MlflowError as error:
        conditions = mlflow_answered(conditions, now, error.reason, error.message)
        return memo.alias_version if memo.alias == alias else None, conditions
    memo.alias, memo.alias_checked_at, memo.alias_version = alias, now, version
    conditions = mlflow_answered(conditions, now)
    if version is None:
        message = f"registered model {selector.name} has no alias {alias!r} (yet)"
    else:
        message = f"{alias} -> version {version}"
    return version, model_resolved(conditions, version is not None, message, now)


def model_resolved(
    conditions: list[Condition], found: bool, message: str, now: dt.datetime,
    reason: str = "AliasResolved",
) -> list[Condition]:  # fmt: skip
    """ModelResolved: True with `reason` when the alias (every alias) names a version."""
    if found:
        return set_condition(conditions, MODEL_RESOLVED, "True", reason, message, now)
    return set_condition(conditions, MODEL_RESOLVED, "False", "AliasNotFound", message, now)


def follow_model(
    deployment: ModelDeployment, reader: MlflowReader, memo: DeploymentMemo,
    conditions: list[Condition], *, now: dt.datetime, poll_seconds: float, shared: bool,
    force: bool,
) -> Followed:  # fmt: skip
    """The ownership check, then the version to serve. Nothing new is rolled out while
    the ownership cannot be checked."""
    model = deployment.spec.model
    assert model is not None, "spec.models and spec.anyModel: follow_models"
    refusal, owner_known, conditions = check_ownership(
        model.name, deployment.metadata.namespace or "", reader, memo, conditions,
        now=now, poll_seconds=poll_seconds, shared=shared, force=force,
    )  # fmt: skip
    if refusal is not None:
        return Followed(refusal=refusal, conditions=conditions)
    version, conditions = desired_version(
        model, reader, memo, conditions, now=now, poll_seconds=poll_seconds, force=force
    )
    return Followed(version=version if owner_known else None, conditions=conditions)
