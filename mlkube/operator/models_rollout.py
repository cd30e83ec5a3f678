"""Rollout decisions for a ModelDeployment of several models (spec.models, spec.anyModel).

One InferenceService serves them all, with every listed model's version pinned in its
predictor's arguments (pods stay immutable, as for one model); anyModel pins nothing. Each
listed model follows its own alias: when one moves, a new revision pins the new set. A
revision that fails (or is not ready within the rollout timeout) sends traffic back to the
set that served, and each model whose version it changed records that version as failed,
so it is not rolled out again until its alias moves on; the other models still follow
theirs. There is no canary (a split between sets of versions says nothing about one model).
Pure: the handler reads MLflow and the InferenceService, this decides.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel

from mlkube.api.common import Condition
from mlkube.api.modeldeployment import ModelDeployment, ModelDeploymentStatus, ModelStatus
from mlkube.api.registered_model import DEFAULT_ALIAS
from mlkube.operator.conditions import held_since, set_condition
from mlkube.operator.events import Event
from mlkube.operator.mlflow_reader import MlflowReader
from mlkube.operator.rollout import (
    READY,
    ROLLOUT,
    DeploymentMemo,
    Followed,
    check_ownership,
    desired_version,
    endpoints,
    follow_model,
    model_resolved,
    plan_rollout,
)
from mlkube.operator.status import InferenceServiceView

Versions = dict[str, int]


class ModelsRollout(BaseModel):
    """The versions the InferenceService should pin (None: no InferenceService yet; {}
    for anyModel) and the new status."""

    target: Versions | None
    status: ModelDeploymentStatus
    events: list[Event] = []


def describe(versions: Versions) -> str:
    return ", ".join(f"{name} v{version}" for name, version in sorted(versions.items())) or "-"


def wanted_versions(desired: dict[str, int | None], served: Versions, failed: Versions) -> Versions:
    """Per model: the version its alias (or pin) names, unless that version failed before,
    or while it names none (MLflow said nothing yet) the version that serves."""
    wanted: Versions = {}
    for name, version in desired.items():
        if version is not None and version != failed.get(name):
            wanted[name] = version
        elif name in served:
            wanted[name] = served[name]
    return wanted


def plan_models_rollout(
    deployment: ModelDeployment,
    previous: ModelDeploymentStatus,
    *,
    desired: dict[str, int | None],
    isvc: InferenceServiceView | None,
    deployment_mode: str | None,
    now: dt.datetime,
    rollout_timeout_seconds: float = 600.0,
) -> ModelsRollout:
    """One reconcile step for several models (`desired`: spec.models' versions by name,
    None where unknown; {} for anyModel)."""
    status = previous.model_copy(deep=True)
    served = {m.name: m.served_version for m in status.models if m.served_version is not None}
    failed = {m.name: m.failed_version for m in status.models if m.failed_version is not None}
    events: list[Event] = []
    target: Versions | None
    if isvc is None:
        wanted = wanted_versions(desired, served, failed)
        target = wanted if wanted or not desired else None
        if target is not None:
            status.phase = "Progressing"
            status.conditions = set_condition(
                status.conditions, ROLLOUT, "Unknown", "Deploying", "", now
            )
            events.append(Event(reason="RolloutStarted", message=f"deploying {describe(target)}"))
    else:
        mode = isvc.deployment_mode or deployment_mode
        status.url = isvc.url
        status.predict_url, status.grpc_address = endpoints(deployment, isvc.url, mode)
        pinned = isvc.model_versions if isvc.model_versions is not None else {}
        state = isvc.state
        reason, message = isvc.reason, isvc.message
        began = held_since(status.conditions, ROLLOUT, "Unknown")
        if (
            state == "Progressing"
            and (pinned != served or not desired)  # anyModel: nothing pinned to compare
            and began is not None
            and (now - began).total_seconds() > rollout_timeout_seconds
        ):
            state, reason = "Failed", "RolloutTimedOut"
            message = f"not ready {rollout_timeout_seconds:.0f} s after the rollout began"
        target = pinned
        if state == "Ready":
            if pinned != served or status.phase != "Ready":
                if pinned != served:
                    events.append(Event(reason="RolledOut", message=f"serving {describe(pinned)}"))
                served = dict(pinned)
            status.phase = "Ready"
            status.message = None
            status.conditions = set_condition(status.conditions, READY, "True", "Ready", "", now)
            status.conditions = set_condition(
                status.conditions, ROLLOUT, "True", "RolledOut", "", now
            )
        elif state == "Failed":
            changed = {n: v for n, v in pinned.items() if served.get(n) != v}
            failed |= changed
            why = f"{describe(changed or pinned)} failed ({reason}): {message}".rstrip(": ")
            if served and served != pinned:
                text = f"{why}; traffic stays on {describe(served)}"
                events.append(Event(type="Warning", reason="RolloutFailed", message=text))
                target = dict(served)
                status.phase = "Progressing"
            else:
                text = why
                if status.phase != "Failed":
                    events.append(Event(type="Warning", reason="RolloutFailed", message=text))
                status.phase = "Failed"
                status.conditions = set_condition(
                    status.conditions, READY, "False", reason or "Failed", text, now
                )
            status.message = text
            status.conditions = set_condition(
                status.conditions, ROLLOUT, "False", "RevisionFailed", text, now
            )
        else:
            status.phase = "Ready" if served and served == pinned else "Progressing"
            if not served:
                status.conditions = set_condition(
                    status.conditions, READY, "Unknown", reason or "Progressing", message, now
                )
        wanted = wanted_versions(desired, served, failed)
        if desired and wanted and wanted != target:
            target = wanted
            status.phase = "Progressing"
            status.message = None
            status.conditions = set_condition(
                status.conditions, ROLLOUT, "Unknown", "RollingOut", "", now
            )
            events.append(Event(reason="RolloutStarted", message=f"rolling out {describe(wanted)}"))
    status.models = model_statuses(deployment, desired, served, failed, isvc_ready=_ready(isvc))
    status.models_ready = models_ready(deployment, status.models)
    status.served_version = None
    return ModelsRollout(target=target, status=status, events=events)


def _ready(isvc: InferenceServiceView | None) -> bool:
    return isvc is not None and isvc.state == "Ready"


def model_statuses(
    deployment: ModelDeployment,
    desired: dict[str, int | None],
    served: Versions,
    failed: Versions,
    *,
    isvc_ready: bool,
) -> list[ModelStatus]:
    """One entry per listed model: what its alias says, what serves, whether it is ready."""
    found = []
    for selector in deployment.spec.models or []:
        name, alias = selector.name, selector.followed_alias
        version = desired.get(name)
        message = None
        if version is None:
            message = f"no alias {alias or DEFAULT_ALIAS!r} in the registry (yet)"
        elif version == failed.get(name) and version != served.get(name):
            message = f"version {version} failed; serving {served.get(name) or 'none'}"
        found.append(
            ModelStatus(
                name=name,
                alias=alias,
                desired_version=version,
                served_version=served.get(name),
                failed_version=failed.get(name),
                ready=isvc_ready and name in served,
                message=message,
            )
        )
    return found


def models_ready(deployment: ModelDeployment, models: list[ModelStatus]) -> str | None:
    """`kubectl get md`'s Models column: "ready/listed", or "any@alias"."""
    if deployment.spec.any_model is not None:
        return f"any@{deployment.spec.any_model.alias}"
    if deployment.spec.models is None:
        return None
    return f"{sum(model.ready for model in models)}/{len(models)}"


# --------------------------------------------------------------------------- following the models


class FollowedModels(BaseModel):
    """A refusal (the namespace may not serve one of the models), or the version each
    listed model's alias names (None: unknown)."""

    refusal: str | None = None
    versions: dict[str, int | None] = {}
    # False while MLflow could not say who owns a model: nothing new is rolled out then.
    owners_known: bool = True
    conditions: list[Condition]

    @property
    def desired(self) -> dict[str, int | None]:
        """The versions to roll out: none new while a model's owner is unknown."""
        if self.owners_known:
            return self.versions
        return dict.fromkeys(self.versions)


def follow_models(
    deployment: ModelDeployment, reader: MlflowReader, memo: DeploymentMemo,
    conditions: list[Condition], *, now: dt.datetime, poll_seconds: float, shared: bool,
    force: bool,
) -> FollowedModels:  # fmt: skip
    """follow_model for each of spec.models, each with its own memo; anyModel follows
    nothing here (the predictor checks each model's owner when it loads it)."""
    namespace = deployment.metadata.namespace or ""
    versions: dict[str, int | None] = {}
    owners_known = True
    unresolved = []
    for index, selector in enumerate(deployment.spec.models or []):
        own = memo.models.setdefault(selector.name, DeploymentMemo())
        refusal, known, conditions = check_ownership(
            selector.name, namespace, reader, own, conditions, now=now,
            poll_seconds=poll_seconds, shared=shared, force=force,
            where=f"spec.models[{index}].name",
        )  # fmt: skip
        if refusal is not None:
            return FollowedModels(refusal=refusal, conditions=conditions)
        owners_known = owners_known and known
        version, conditions = desired_version(
            selector, reader, own, conditions, now=now, poll_seconds=poll_seconds, force=force
        )
        versions[selector.name] = version
        if version is None:
            unresolved.append(selector.name)
    if deployment.spec.models:
        if unresolved:
            message = f"no version yet for {', '.join(unresolved)}"
        else:
            message = f"{len(versions)} models resolved: {describe(_known(versions))}"
        conditions = model_resolved(conditions, not unresolved, message, now, "AliasesResolved")
    return FollowedModels(versions=versions, owners_known=owners_known, conditions=conditions)


def _known(versions: dict[str, int | None]) -> Versions:
    return {name: version for name, version in versions.items() if version is not None}


# --------------------------------------------------------------------------- either kind


class Plan(BaseModel):
    """What to make of a ModelDeployment of either kind: the version(s) its
    InferenceService pins (None: none yet), the canary share, the new status, events."""

    pinned: int | Versions | None
    canary_traffic_percent: int | None = None
    status: ModelDeploymentStatus
    events: list[Event] = []


def follow_deployment(
    deployment: ModelDeployment, reader: MlflowReader, memo: DeploymentMemo,
    conditions: list[Condition], *, now: dt.datetime, poll_seconds: float, shared: bool,
    force: bool,
) -> Followed | FollowedModels:  # fmt: skip
    """follow_model for one model, follow_models for several."""
    follow = follow_models if deployment.spec.serves_many else follow_model
    return follow(
        deployment, reader, memo, conditions, now=now, poll_seconds=poll_seconds,
        shared=shared, force=force,
    )  # fmt: skip


def plan_deployment(
    deployment: ModelDeployment,
    previous: ModelDeploymentStatus,
    followed: Followed | FollowedModels,
    *,
    isvc: InferenceServiceView | None,
    deployment_mode: str | None,
    now: dt.datetime,
    rollout_timeout_seconds: float,
) -> Plan:
    """plan_rollout for one model, plan_models_rollout for several."""
    if isinstance(followed, FollowedModels):
        many = plan_models_rollout(
            deployment, previous, desired=followed.desired, isvc=isvc,
            deployment_mode=deployment_mode, now=now,
            rollout_timeout_seconds=rollout_timeout_seconds,
        )  # fmt: skip
        return Plan(pinned=many.target, status=many.status, events=many.events)
    one = plan_rollout(
        deployment, previous, desired_version=followed.version, isvc=isvc,
        deployment_mode=deployment_mode, now=now, rollout_timeout_seconds=rollout_timeout_seconds,
    )  # fmt: skip
    return Plan(
        pinned=one.target_version, canary_traffic_percent=one.canary_traffic_percent,
        status=one.status, events=one.events,
    )  # fmt: skip
