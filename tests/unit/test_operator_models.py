"""A ModelDeployment of several models: the spec, the InferenceService it makes, following
each model's alias, and the rollout of a set of pinned versions."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from pydantic import ValidationError

from mlkube.api import ModelDeployment
from mlkube.api.manifest import format_validation_error
from mlkube.api.modeldeployment import ModelDeploymentStatus
from mlkube.operator.commands import render_versions
from mlkube.operator.conditions import find_condition
from mlkube.operator.inferenceservice import build_inferenceservice, inferenceservice_patch
from mlkube.operator.mlflow_reader import MlflowUnavailable, ModelOwnership
from mlkube.operator.models_rollout import (
    FollowedModels,
    ModelsRollout,
    follow_models,
    plan_models_rollout,
)
from mlkube.operator.rollout import MODEL_RESOLVED, DeploymentMemo
from mlkube.operator.status import InferenceServiceView, RolloutState, inferenceservice_view

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TWO = [{"name": "fraud"}, {"name": "churn", "alias": "prod"}]


def deployment(**spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {"metadata": {"name": "many", "namespace": "team-a"}, "spec": spec}
    )


def error_of(**spec: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        deployment(**spec)
    return format_validation_error(caught.value)


# --------------------------------------------------------------------------- the spec


def test_one_of_model_models_any_model() -> None:
    assert deployment(models=TWO).spec.serves_many
    assert deployment(anyModel={}).spec.any_model.alias == "champion"  # type: ignore[union-attr]
    assert not deployment(model={"name": "m"}).spec.serves_many
    both = error_of(model={"name": "m"}, models=TWO)
    assert both == "spec: give exactly one of model, models, anyModel"
    assert error_of() == "spec: give exactly one of model, models, anyModel"
    assert error_of(models=TWO, anyModel={}).endswith("give exactly one of model, models, anyModel")


def test_models_are_listed_once_and_each_names_alias_or_version() -> None:
    twice = error_of(models=[{"name": "fraud"}, {"name": "fraud", "version": 2}])
    assert twice == "spec: models: 'fraud' is listed more than once"
    assert error_of(models=[]).startswith("spec.models: List should have at least 1 item")
    assert error_of(models=[{"name": "x", "alias": "a", "version": 1}]).startswith(
        "spec.models.0: give alias or version, not both"
    )


def test_a_canary_needs_one_model_and_the_budget_is_a_quantity() -> None:
    canary = error_of(models=TWO, canary={"trafficPercent": 10})
    assert canary.startswith("spec: canary: a canary splits traffic between versions of one")
    assert deployment(models=TWO, memoryBudget="512Mi").spec.memory_budget == "512Mi"
    assert error_of(models=TWO, memoryBudget="lots").startswith("spec.memoryBudget: String")


# --------------------------------------------------------------------------- the InferenceService


def args_of(isvc: dict[str, Any]) -> list[str]:
    return list(isvc["spec"]["predictor"]["containers"][0]["args"])


def values_of(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == option]


def test_listed_models_are_pinned_one_by_one_and_checked_for_their_owner() -> None:
    md = deployment(models=TWO, memoryBudget="1Gi", ttlSeconds=60)
    isvc = build_inferenceservice(
        md, {"fraud": 3, "churn": 7}, tracking_uri="u", image="i", owner_namespace="team-a"
    )
    args = args_of(isvc)
    assert values_of(args, "--serve-model") == ["churn=models:/churn/7", "fraud=models:/fraud/3"]
    assert values_of(args, "--owner-namespace") == ["team-a"]
    assert values_of(args, "--memory-budget") == ["1Gi"]
    assert "--model-uri" not in args and "--multi-model" not in args
    # One model that does not load must not take the others down with the process.
    assert "--exit-if-unloadable" not in args
    assert "mlkube.io/model-version" not in isvc["spec"]["predictor"]["labels"]
    annotations = isvc["metadata"]["annotations"]
    assert json.loads(annotations["mlkube.io/model-versions"]) == {"churn": 7, "fraud": 3}
    assert "mlkube.io/model-version" not in annotations
    assert inferenceservice_view(isvc).model_versions == {"churn": 7, "fraud": 3}


def test_any_model_serves_by_name_at_its_alias_and_shared_models_skip_the_owner() -> None:
    md = deployment(anyModel={"alias": "prod"})
    args = args_of(build_inferenceservice(md, {}, tracking_uri="u", image="i"))
    assert "--multi-model" in args and values_of(args, "--alias") == ["prod"]
    assert "--owner-namespace" not in args  # None: the admin allows shared models
    owned = args_of(
        build_inferenceservice(md, {}, tracking_uri="u", image="i", owner_namespace="t")
    )
    assert values_of(owned, "--owner-namespace") == ["t"]


def test_from_one_model_to_several_the_old_pin_is_removed() -> None:
    one = build_inferenceservice(
        deployment(model={"name": "fraud"}), 3, tracking_uri="u", image="i"
    )
    many = build_inferenceservice(deployment(models=TWO), {"fraud": 3}, tracking_uri="u", image="i")
    patch = inferenceservice_patch(one, many)
    assert patch is not None
    assert patch["metadata"]["annotations"]["mlkube.io/model-version"] is None
    assert patch["metadata"]["annotations"]["mlkube.io/model-versions"] == '{"fraud":3}'


def test_render_pins_each_model() -> None:
    md = deployment(models=[{"name": "fraud", "version": 2}, {"name": "churn"}])
    assert render_versions(md, 5, "f.yaml") == {"fraud": 2, "churn": 5}
    assert render_versions(deployment(anyModel={}), None, "f.yaml") == {}
    with pytest.raises(Exception, match="follows an alias of churn; give --model-version"):
        render_versions(md, None, "f.yaml")


# --------------------------------------------------------------------------- the rollout


def view(pinned: dict[str, int], state: RolloutState) -> InferenceServiceView:
    return InferenceServiceView(
        version=None, model_versions=pinned, canary_traffic_percent=None, deployment_mode=None,
        state=state, reason="RevisionFailed" if state == "Failed" else "", message="exit 1",
        url="http://many.team-a",
    )  # fmt: skip


def step(
    md: ModelDeployment,
    status: ModelDeploymentStatus,
    desired: dict[str, int | None],
    isvc: InferenceServiceView | None,
) -> ModelsRollout:
    return plan_models_rollout(
        md, status, desired=desired, isvc=isvc, deployment_mode=None, now=NOW
    )


def serving(md: ModelDeployment, versions: dict[str, int]) -> ModelDeploymentStatus:
    """The status once `versions` were deployed and became ready."""
    desired: dict[str, int | None] = dict(versions)
    first = step(md, ModelDeploymentStatus(), desired, None).status
    return step(md, first, desired, view(versions, "Ready")).status


def served(rollout: ModelsRollout) -> dict[str, int | None]:
    return {m.name: m.served_version for m in rollout.status.models}


def test_first_deploy_then_each_model_is_ready() -> None:
    md = deployment(models=TWO)
    first = step(md, ModelDeploymentStatus(), {"fraud": 3, "churn": 7}, None)
    assert first.target == {"fraud": 3, "churn": 7} and first.status.phase == "Progressing"
    assert first.status.models_ready == "0/2"
    ready = step(
        md, first.status, {"fraud": 3, "churn": 7}, view({"fraud": 3, "churn": 7}, "Ready")
    )
    assert ready.status.phase == "Ready" and ready.status.models_ready == "2/2"
    assert served(ready) == {"fraud": 3, "churn": 7}
    assert [m.ready for m in ready.status.models] == [True, True]
    assert ready.status.predict_url == "http://many.team-a/v1/models/{model}:predict"
    assert [e.reason for e in ready.events] == ["RolledOut"]
    again = step(
        md, ready.status, {"fraud": 3, "churn": 7}, view({"fraud": 3, "churn": 7}, "Ready")
    )
    assert again.events == [] and again.target == {"fraud": 3, "churn": 7}


def test_a_model_without_a_version_yet_waits_while_the_others_serve() -> None:
    md = deployment(models=TWO)
    first = step(md, ModelDeploymentStatus(), {"fraud": 3, "churn": None}, None)
    assert first.target == {"fraud": 3}
    churn = first.status.models[1]
    assert churn.desired_version is None and "no alias 'prod'" in (churn.message or "")
    nothing = step(md, ModelDeploymentStatus(), {"fraud": None, "churn": None}, None)
    assert nothing.target is None and nothing.status.phase == "Pending"


def test_one_alias_moves_and_only_that_pin_changes() -> None:
    md = deployment(models=TWO)
    status = serving(md, {"fraud": 3, "churn": 7})
    moved = step(md, status, {"fraud": 4, "churn": 7}, view({"fraud": 3, "churn": 7}, "Ready"))
    assert moved.target == {"fraud": 4, "churn": 7} and moved.status.phase == "Progressing"
    assert served(moved) == {"fraud": 3, "churn": 7}  # the old set serves meanwhile
    assert [e.reason for e in moved.events] == ["RolloutStarted"]


def test_a_failed_set_goes_back_and_the_failed_version_is_not_tried_again() -> None:
    md = deployment(models=TWO)
    status = serving(md, {"fraud": 3, "churn": 7})
    failed = step(md, status, {"fraud": 4, "churn": 7}, view({"fraud": 4, "churn": 7}, "Failed"))
    assert failed.target == {"fraud": 3, "churn": 7}
    assert [e.reason for e in failed.events] == ["RolloutFailed"]
    assert "fraud v4 failed" in (failed.status.message or "")
    fraud = failed.status.models[0]
    assert (fraud.failed_version, fraud.served_version) == (4, 3)
    # back on the old set: fraud v4 stays out, churn's new version still rolls out
    back = step(
        md, failed.status, {"fraud": 4, "churn": 8}, view({"fraud": 3, "churn": 7}, "Ready")
    )
    assert back.target == {"fraud": 3, "churn": 8}
    # fraud's alias moves on: its new version is tried
    later = step(md, back.status, {"fraud": 5, "churn": 8}, view({"fraud": 3, "churn": 8}, "Ready"))
    assert later.target == {"fraud": 5, "churn": 8}


def test_any_model_deploys_at_once_and_pins_nothing() -> None:
    md = deployment(anyModel={})
    first = step(md, ModelDeploymentStatus(), {}, None)
    assert first.target == {} and first.status.models_ready == "any@champion"
    ready = step(md, first.status, {}, view({}, "Ready"))
    assert ready.status.phase == "Ready" and ready.target == {}


# --------------------------------------------------------------------------- following


class Registry:
    """MLflow's registry as the operator reads it, per model: aliases and owner tags."""

    tracking_uri = "http://mlflow:5000"

    def __init__(self, aliases: dict[tuple[str, str], int], owners: dict[str, str]) -> None:
        self.aliases, self.owners, self.down = aliases, owners, False

    def resolve_alias(self, model: str, alias: str) -> int | None:
        if self.down:
            raise MlflowUnavailable("MLflow did not answer")
        return self.aliases.get((model, alias))

    def model_ownership(self, model: str) -> ModelOwnership:
        if self.down:
            raise MlflowUnavailable("MLflow did not answer")
        return ModelOwnership(registered=True, owner=self.owners.get(model))

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> None:
        raise AssertionError("a ModelDeployment reads no TrainingRun outcome")


def follow(md: ModelDeployment, registry: Registry, *, force: bool = True) -> FollowedModels:
    return follow_models(
        md, registry, DeploymentMemo(), [], now=NOW, poll_seconds=30, shared=False, force=force
    )


def test_each_model_follows_its_own_alias() -> None:
    registry = Registry(
        {("fraud", "champion"): 3, ("churn", "prod"): 7, ("churn", "champion"): 1},
        {"fraud": "team-a", "churn": "team-a"},
    )
    followed = follow(deployment(models=TWO), registry)
    assert followed.refusal is None and followed.desired == {"fraud": 3, "churn": 7}
    resolved = find_condition(followed.conditions, MODEL_RESOLVED)
    assert resolved is not None and resolved.status == "True"


def test_a_model_of_another_namespace_refuses_the_deployment_naming_it() -> None:
    registry = Registry(
        {("fraud", "champion"): 3, ("churn", "prod"): 7}, {"fraud": "team-a", "churn": "team-b"}
    )
    followed = follow(deployment(models=TWO), registry)
    assert followed.refusal is not None
    assert followed.refusal.startswith(
        "spec.models[1].name: registered model 'churn' belongs to namespace 'team-b', not 'team-a'"
    )


def test_nothing_new_rolls_out_while_owners_are_unknown() -> None:
    registry = Registry({("fraud", "champion"): 3}, {"fraud": "team-a"})
    registry.down = True
    followed = follow(deployment(models=[{"name": "fraud"}]), registry)
    assert followed.refusal is None and followed.desired == {"fraud": None}


def test_the_budget_leaves_room_for_the_server() -> None:
    over = error_of(models=TWO, memoryBudget="2Gi")  # resources.memory defaults to 2Gi
    assert over == (
        "spec: memoryBudget: 2Gi leaves no room in the predictor's 2Gi (resources.memory) "
        "for the server itself"
    )
    assert deployment(models=TWO, memoryBudget="3Gi", resources={"memory": "4Gi"}).spec


def test_from_several_models_back_to_one_the_one_is_rolled_out() -> None:
    from mlkube.operator.rollout import plan_rollout

    one = deployment(model={"name": "fraud"})
    rollout = plan_rollout(
        one, ModelDeploymentStatus(phase="Ready"), desired_version=3,
        isvc=view({"fraud": 3, "churn": 7}, "Ready"), deployment_mode=None, now=NOW,
    )  # fmt: skip
    assert rollout.target_version == 3 and rollout.status.phase == "Progressing"


def test_a_predictor_that_never_gets_ready_times_out_for_any_model_too() -> None:
    md = deployment(anyModel={})
    first = step(md, ModelDeploymentStatus(), {}, None)
    late = plan_models_rollout(
        md, first.status, desired={}, isvc=view({}, "Progressing"), deployment_mode=None,
        now=NOW + dt.timedelta(seconds=601), rollout_timeout_seconds=600,
    )  # fmt: skip
    assert late.status.phase == "Failed" and "not ready 600 s" in (late.status.message or "")
    early = plan_models_rollout(
        md, first.status, desired={}, isvc=view({}, "Progressing"), deployment_mode=None,
        now=NOW + dt.timedelta(seconds=10), rollout_timeout_seconds=600,
    )  # fmt: skip
    assert early.status.phase == "Progressing"


def test_a_new_set_not_ready_in_time_goes_back() -> None:
    md = deployment(models=TWO)
    status = serving(md, {"fraud": 3, "churn": 7})
    moved = step(md, status, {"fraud": 4, "churn": 7}, view({"fraud": 3, "churn": 7}, "Ready"))
    late = plan_models_rollout(
        md, moved.status, desired={"fraud": 4, "churn": 7},
        isvc=view({"fraud": 4, "churn": 7}, "Progressing"), deployment_mode=None,
        now=NOW + dt.timedelta(seconds=601), rollout_timeout_seconds=600,
    )  # fmt: skip
    assert late.target == {"fraud": 3, "churn": 7}
    assert "RolloutTimedOut" in (late.status.message or "")
    assert late.status.models[0].failed_version == 4
