"""ModelDeployment rollout decisions: first deploy, follow the alias, canary, failure."""

from __future__ import annotations

import datetime as dt

from mlkube.api import ModelDeployment
from mlkube.api.modeldeployment import ModelDeploymentStatus
from mlkube.operator.conditions import MLFLOW_REACHABLE, find_condition
from mlkube.operator.mlflow_reader import MlflowUnavailable, ModelOwnership
from mlkube.operator.rollout import (
    CANARY_SUPPORTED,
    MODEL_RESOLVED,
    ROLLOUT,
    DeploymentMemo,
    Followed,
    Rollout,
    follow_model,
    plan_rollout,
)
from mlkube.operator.status import InferenceServiceView, RolloutState

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def deployment(**spec: object) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {"metadata": {"name": "d", "namespace": "ns"}, "spec": {"model": {"name": "m"}, **spec}}
    )


def view(
    version: int, state: RolloutState, canary: int | None = None, mode: str | None = None
) -> InferenceServiceView:
    return InferenceServiceView(
        version=version, canary_traffic_percent=canary, deployment_mode=mode, state=state,
        reason="RevisionFailed" if state == "Failed" else "", message="exit 1",
        url="http://isvc",
    )  # fmt: skip


def step(
    md: ModelDeployment,
    status: ModelDeploymentStatus,
    desired: int | None,
    isvc: InferenceServiceView | None,
    mode: str | None = None,
) -> Rollout:
    return plan_rollout(
        md, status, desired_version=desired, isvc=isvc, deployment_mode=mode, now=NOW
    )


def test_first_deploy_then_ready() -> None:
    md = deployment()
    first = step(md, ModelDeploymentStatus(), 1, None)
    assert (first.target_version, first.canary_traffic_percent) == (1, None)
    assert first.status.phase == "Progressing"
    assert [e.reason for e in first.events] == ["RolloutStarted"]
    ready = step(md, first.status, 1, view(1, "Ready"))
    assert ready.status.phase == "Ready"
    assert ready.status.served_version == 1 and ready.status.url == "http://isvc"
    assert [e.reason for e in ready.events] == ["RolledOut"]
    # Nothing to do: no events.
    assert step(md, ready.status, 1, view(1, "Ready")).events == []


def test_no_alias_yet_makes_nothing() -> None:
    nothing = step(deployment(), ModelDeploymentStatus(), None, None)
    assert nothing.target_version is None and nothing.status.phase == "Pending"


def test_alias_moves_with_canary_then_promotes() -> None:
    md = deployment(canary={"trafficPercent": 25})
    serving = ModelDeploymentStatus(phase="Ready", served_version=1)
    start = step(md, serving, 2, view(1, "Ready"))
    assert (start.target_version, start.canary_traffic_percent) == (2, 25)
    assert start.status.canary and start.status.canary.version == 2
    assert start.status.canary.traffic_percent == 25
    supported = find_condition(start.status.conditions, CANARY_SUPPORTED)
    assert supported and supported.status == "True"
    rolling = step(md, start.status, 2, view(2, "Progressing", canary=25))
    assert (rolling.target_version, rolling.canary_traffic_percent) == (2, 25)
    assert rolling.status.phase == "Progressing"
    promoted = step(md, rolling.status, 2, view(2, "Ready", canary=25))
    assert (promoted.target_version, promoted.canary_traffic_percent) == (2, None)
    assert [e.reason for e in promoted.events] == ["CanaryPromoted"]
    # Served once the InferenceService is ready without the split.
    assert promoted.status.served_version == 1 and promoted.status.phase == "Progressing"
    whole = step(md, promoted.status, 2, view(2, "Ready"))
    assert whole.status.served_version == 2 and whole.status.previous_version == 1
    assert whole.status.canary is None and whole.status.phase == "Ready"
    assert [e.reason for e in whole.events] == ["RolledOut"]


def test_failed_revision_keeps_traffic_on_the_previous_version() -> None:
    md = deployment(canary={"trafficPercent": 10})
    rolling = ModelDeploymentStatus(phase="Progressing", served_version=1)
    failed = step(md, rolling, 2, view(2, "Failed", canary=10))
    assert (failed.target_version, failed.canary_traffic_percent) == (1, None)
    assert failed.status.failed_version == 2
    assert failed.status.message and "traffic stays on version 1" in failed.status.message
    assert [e.type for e in failed.events] == ["Warning"]
    # The alias still points at 2: not rolled out again; the status keeps saying why.
    back = step(md, failed.status, 2, view(1, "Ready"))
    assert back.target_version == 1 and back.status.phase == "Ready"
    rolled = find_condition(back.status.conditions, ROLLOUT)
    assert rolled and rolled.status == "False" and rolled.reason == "RevisionFailed"
    # The alias moves on to 3: rolled out.
    assert step(md, back.status, 3, view(1, "Ready")).target_version == 3


def test_pinned_rollback_is_whole_not_a_canary() -> None:
    md = deployment(model={"name": "m", "version": 1}, canary={"trafficPercent": 10})
    serving = ModelDeploymentStatus(phase="Ready", served_version=2, previous_version=1)
    back = step(md, serving, 1, view(2, "Ready"))
    assert (back.target_version, back.canary_traffic_percent) == (1, None)


def test_first_deployment_failing_is_failed() -> None:
    md = deployment()
    failed = step(md, ModelDeploymentStatus(phase="Progressing"), 1, view(1, "Failed"))
    assert failed.status.phase == "Failed" and failed.target_version == 1
    again = step(md, failed.status, 1, view(1, "Failed"))
    assert again.events == []


def test_raw_mode_reports_canary_unsupported() -> None:
    md = deployment(canary={"trafficPercent": 25})
    serving = ModelDeploymentStatus(phase="Ready", served_version=1)
    start = step(md, serving, 2, view(1, "Ready", mode="RawDeployment"))
    assert (start.target_version, start.canary_traffic_percent) == (2, None)
    unsupported = find_condition(start.status.conditions, CANARY_SUPPORTED)
    assert unsupported and unsupported.status == "False" and unsupported.reason == "RawDeployment"
    also = step(md, serving, 2, view(1, "Ready"), mode="Standard")
    assert also.canary_traffic_percent is None


def test_a_rollout_not_ready_in_time_fails_and_traffic_stays() -> None:
    """A new version's pod that never becomes Ready fails nothing in raw mode (the old pod
    keeps serving); after the rollout timeout the operator records it as failed and pins
    the served version again."""
    md = deployment()
    serving = step(md, step(md, ModelDeploymentStatus(), 1, None).status, 1, view(1, "Ready"))
    started = step(md, serving.status, 2, view(1, "Ready"))
    assert started.target_version == 2
    later = NOW + dt.timedelta(seconds=60)
    waiting = plan_rollout(
        md,
        started.status,
        desired_version=2,
        isvc=view(2, "Progressing"),
        deployment_mode="Standard",
        now=later,
        rollout_timeout_seconds=120,
    )
    assert waiting.target_version == 2 and waiting.status.failed_version is None
    late = NOW + dt.timedelta(seconds=121)
    failed = plan_rollout(
        md,
        waiting.status,
        desired_version=2,
        isvc=view(2, "Progressing"),
        deployment_mode="Standard",
        now=late,
        rollout_timeout_seconds=120,
    )
    assert failed.target_version == 1 and failed.status.failed_version == 2
    assert failed.status.message and "traffic stays on version 1" in failed.status.message
    assert "RolloutTimedOut" in failed.status.message
    assert [e.reason for e in failed.events] == ["RolloutFailed"]
    # The version already served is never timed out, however long the Deployment scales.
    steady = plan_rollout(
        md,
        serving.status,
        desired_version=1,
        isvc=view(1, "Progressing"),
        deployment_mode="Standard",
        now=late,
        rollout_timeout_seconds=1,
    )
    assert steady.target_version == 1 and steady.status.failed_version is None


# --------------------------------------------------------------------------- following the model


class Registry:
    """MLflow's registry as the operator reads it: aliases and owner tags; while `down`,
    every call fails the way an unreachable server does. `asked` lists the calls made."""

    tracking_uri = "http://mlflow:5000"

    def __init__(self, aliases: dict[str, int], owner: str | None = "ns") -> None:
        self.aliases, self.owner, self.down = aliases, owner, False
        self.asked: list[str] = []

    def _call(self, what: str) -> None:
        self.asked.append(what)
        if self.down:
            raise MlflowUnavailable("MLflow did not answer")

    def resolve_alias(self, model: str, alias: str) -> int | None:
        self._call(f"alias {alias}")
        return self.aliases.get(alias)

    def model_ownership(self, model: str) -> ModelOwnership:
        self._call("owner")
        return ModelOwnership(registered=True, owner=self.owner)

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> None:
        raise AssertionError("a ModelDeployment reads no TrainingRun outcome")


def follow(
    md: ModelDeployment, registry: Registry, memo: DeploymentMemo, seconds: float = 0,
    *, force: bool = False, shared: bool = False,
) -> Followed:  # fmt: skip
    return follow_model(
        md, registry, memo, [], now=NOW + dt.timedelta(seconds=seconds), poll_seconds=30,
        shared=shared, force=force,
    )  # fmt: skip


def condition(followed: Followed, kind: str) -> tuple[str, str]:
    found = find_condition(followed.conditions, kind)
    assert found is not None
    return found.status, found.reason


def test_the_alias_is_asked_of_mlflow_at_most_once_per_poll_interval_unless_forced() -> None:
    registry, memo = Registry({"champion": 3}), DeploymentMemo()
    first = follow(deployment(), registry, memo)
    assert first.version == 3 and condition(first, MODEL_RESOLVED) == ("True", "AliasResolved")
    registry.aliases["champion"] = 4
    registry.asked.clear()
    assert follow(deployment(), registry, memo, 10).version == 3
    assert registry.asked == []
    # A spec change (forced) or the interval passed: asked again.
    assert follow(deployment(), registry, memo, 10, force=True).version == 4
    registry.aliases["champion"] = 5
    assert follow(deployment(), registry, memo, 45).version == 5
    # Another alias in the spec is looked up at once.
    registry.aliases["blue"] = 1
    assert follow(deployment(model={"name": "m", "alias": "blue"}), registry, memo, 46).version == 1


def test_while_mlflow_is_down_the_last_version_stays_and_the_status_says_so() -> None:
    """With shared models (no ownership to check): what the alias last pointed at."""
    registry, memo = Registry({"champion": 3, "blue": 1}), DeploymentMemo()
    follow(deployment(), registry, memo, shared=True)
    registry.down = True
    down = follow(deployment(), registry, memo, 60, shared=True)
    assert down.version == 3
    assert condition(down, MLFLOW_REACHABLE) == ("False", "Unreachable")
    # The version of another alias is not known: nothing is rolled out for it.
    blue = deployment(model={"name": "m", "alias": "blue"})
    assert follow(blue, registry, memo, 61, shared=True).version is None


def test_a_pinned_version_needs_no_alias() -> None:
    registry = Registry({})
    pinned = follow(deployment(model={"name": "m", "version": 2}), registry, DeploymentMemo())
    assert pinned.version == 2 and condition(pinned, MODEL_RESOLVED) == ("True", "Pinned")
    assert registry.asked == ["owner"]


def test_another_namespaces_model_is_refused_and_nothing_is_resolved() -> None:
    registry, memo = Registry({"champion": 3}, owner="team-a"), DeploymentMemo()
    refused = follow(deployment(), registry, memo)
    assert refused.refusal is not None and "belongs to namespace 'team-a'" in refused.refusal
    assert refused.version is None and registry.asked == ["owner"]
    # Remembered for the interval; shared models (the admin's choice) ask nothing.
    assert follow(deployment(), registry, memo, 10).refusal == refused.refusal
    assert registry.asked == ["owner"]
    shared = follow(deployment(), registry, DeploymentMemo(), shared=True)
    assert (shared.refusal, shared.version) == (None, 3)


def test_an_owner_that_cannot_be_checked_rolls_nothing_out() -> None:
    """Even the version the alias last pointed at: the owner may have changed meanwhile."""
    registry, memo = Registry({"champion": 3}), DeploymentMemo()
    assert follow(deployment(), registry, memo).version == 3
    registry.down = True
    unknown = follow(deployment(), registry, memo, 60)
    assert (unknown.refusal, unknown.version) == (None, None)
    assert condition(unknown, MLFLOW_REACHABLE) == ("False", "Unreachable")
