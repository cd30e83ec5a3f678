"""kopf handlers: thin. Read the objects, call the pure builders and decisions, write back.

    kopf run --standalone --all-namespaces -m mlkube.operator.handlers
or  python -m mlkube.operator
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf
from pydantic import BaseModel, ValidationError

from mlkube.api.common import GROUP, VERSION
from mlkube.api.manifest import format_validation_error
from mlkube.api.modeldeployment import ModelDeployment, ModelDeploymentStatus
from mlkube.api.trainingrun import TrainingRun, TrainingRunStatus, TrialCounts
from mlkube.operator import kube
from mlkube.operator.inferenceservice import build_inferenceservice, carries
from mlkube.operator.metrics import CHILDREN_CREATED, MLFLOW_ERRORS, TRANSITIONS, measured
from mlkube.operator.mlflow_reader import GuardedReader, MlflowError, reader_for
from mlkube.operator.names import (
    ANNOTATION_DEPLOYMENT_MODE,
    MANAGED_BY,
    OPERATOR_NAME,
    inferenceservice_name,
    rayjob_name,
)
from mlkube.operator.rayjob import build_rayjob
from mlkube.operator.rollout import MODEL_RESOLVED, plan_rollout, refused_deployment_status
from mlkube.operator.settings import get_settings
from mlkube.operator.status import (
    MLFLOW_REACHABLE,
    SUCCEEDED,
    TERMINAL_PHASES,
    find_condition,
    inferenceservice_view,
    refused_trainingrun_status,
    set_condition,
    status_patch,
    trainingrun_status,
)
from mlkube.operator.tracking import (
    NOT_ALLOWED,
    TrackingTarget,
    TrackingUriNotAllowed,
    tracking_target,
)

TRAININGRUNS = (GROUP, VERSION, "trainingruns")
MODELDEPLOYMENTS = (GROUP, VERSION, "modeldeployments")
OURS = {MANAGED_BY: OPERATOR_NAME}
SETTINGS = get_settings()
LOG = logging.getLogger("mlkube.operator")


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere $KUBECONFIG (mlkube.kube_config)."""
    return kube.connection_info(settings)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    kube.configure()
    # kopf would post each "Handler succeeded" log line as an Event (timers tick every few
    # seconds); only its warnings go out, our transitions are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = SETTINGS.max_workers
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 10


# --------------------------------------------------------------------------- shared


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(model: type[BaseModel], body: kopf.Body) -> Any:
    """The custom resource as our pydantic model; the CRD schema has let it in, so a
    failure here is a bug or a schema drift: permanent, with the field named."""
    document = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.metadata),
        "spec": dict(body.spec),
    }
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise kopf.PermanentError(f"invalid spec: {format_validation_error(error)}") from None


def _status_of(model: type[BaseModel], status: kopf.Status) -> Any:
    """The current status, tolerant of fields this version does not know (kopf's own)."""
    known = {field.alias or name for name, field in model.model_fields.items()}
    try:
        return model.model_validate({k: v for k, v in status.items() if k in known})
    except ValidationError:
        return model()


def post(body: kopf.Body, kind: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the object, and the same line in the operator's log."""
    kopf.event(body, type=kind, reason=reason, message=message)
    level = logging.WARNING if kind == "Warning" else logging.INFO
    LOG.log(level, "%s %s/%s: %s: %s", body.get("kind"), body.metadata.namespace,
            body.metadata.name, reason, message)  # fmt: skip


def _target(spec_uri: str | None) -> TrackingTarget:
    """The MLflow a resource's spec asks for, if the admin allows it (TrackingUriNotAllowed)."""
    return tracking_target(spec_uri, SETTINGS.mlflow_tracking_uri, SETTINGS.mlflow_allowed_hosts)


def _mlflow(target: TrackingTarget) -> GuardedReader:
    return reader_for(
        target,
        timeout=SETTINGS.mlflow_timeout_seconds,
        backoff_initial=SETTINGS.mlflow_backoff_initial_seconds,
        backoff_max=SETTINGS.mlflow_backoff_max_seconds,
    )


def _announce_mlflow(body: kopf.Body, before: Any, after: Any) -> None:
    old, new = find_condition(before, MLFLOW_REACHABLE), find_condition(after, MLFLOW_REACHABLE)
    if new is None or (old is not None and old.status == new.status):
        return
    if new.status == "False":
        post(body, "Warning", f"Mlflow{new.reason}", new.message)
    elif old is not None:
        post(body, "Normal", "MlflowReachable", "MLflow answers again")


def _owner_uids(meta: kopf.Meta, kind: str) -> list[str]:
    refs = meta.get("ownerReferences") or []
    return [ref["uid"] for ref in refs if ref.get("kind") == kind and ref.get("uid")]


# --------------------------------------------------------------------------- indexes
# In-memory views of our children, kept current by kopf's watches: status syncs read
# these instead of asking the API server every few seconds for every object.


@kopf.index("ray.io", "v1", "rayjobs", labels=OURS)
def rayjobs_by_owner(meta: kopf.Meta, status: kopf.Status, **_: Any) -> dict[str, Any]:
    return {uid: dict(status) for uid in _owner_uids(meta, "TrainingRun")}


def _first(index: kopf.Index[str, Any], key: str) -> Any | None:
    return next(iter(index.get(key, [])), None)


# --------------------------------------------------------------------------- TrainingRun


@kopf.on.create(*TRAININGRUNS)
@measured("trainingrun", "create")
def create_rayjob(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    """Create (or adopt, after a restart) the one RayJob of this TrainingRun."""
    run: TrainingRun = _parse(TrainingRun, body)
    previous: TrainingRunStatus = _status_of(TrainingRunStatus, body.status)
    try:
        _target(run.spec.mlflow.tracking_uri)
    except TrackingUriNotAllowed as refused:
        new = refused_trainingrun_status(previous, NOT_ALLOWED, str(refused), _now())
        new.observed_generation = meta.get("generation")
        patch.status.update(status_patch(body.status, new))
        post(body, "Warning", NOT_ALLOWED, str(refused))
        return
    manifest = build_rayjob(run, SETTINGS.mlflow_tracking_uri)
    kopf.adopt(manifest, owner=body)
    _, created = kube.create_or_adopt(kube.RAYJOB, manifest, meta["uid"])
    name = manifest["metadata"]["name"]
    if created:
        CHILDREN_CREATED.labels("RayJob").inc()
        post(body, "Normal", "RayJobCreated", f"created RayJob {name}")
    else:
        post(body, "Normal", "RayJobAdopted", f"RayJob {name} already existed")
    new = previous.model_copy(deep=True)
    new.ray_job_name = name
    new.observed_generation = meta.get("generation")
    new.trials = new.trials or TrialCounts(completed=0, total=run.spec.tuning.num_trials)
    new.conditions = set_condition(
        new.conditions, SUCCEEDED, "Unknown", "RayJobCreated", f"RayJob {name}", _now()
    )
    patch.status.update(status_patch(body.status, new))


def _trainingrun_active(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL_PHASES and bool(status.get("rayJobName"))


# (type: ignore: kopf's handler protocols do not know the index kwargs.)
@kopf.timer(*TRAININGRUNS, interval=SETTINGS.status_poll_seconds, when=_trainingrun_active)  # type: ignore[arg-type]
@measured("trainingrun", "sync")
def sync_trainingrun(
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    rayjobs_by_owner: kopf.Index[str, Any],
    **_: Any,
) -> None:
    """RayJob status + the MLflow parent run -> TrainingRun status."""
    previous: TrainingRunStatus = _status_of(TrainingRunStatus, body.status)
    uid = meta["uid"]
    rayjob_status = _first(rayjobs_by_owner, uid)
    exists = rayjob_status is not None
    if not exists:
        # The watch may lag behind a fresh create: ask the API server before concluding.
        found = kube.get(kube.RAYJOB, meta["namespace"], rayjob_name(meta["name"]))
        exists, rayjob_status = found is not None, (found or {}).get("status")
    run: TrainingRun = _parse(TrainingRun, body)
    started = bool((rayjob_status or {}).get("jobStatus")) or not exists
    outcome, mlflow_error, mlflow_reason = None, None, ""
    if started:
        try:
            outcome = _mlflow(_target(run.spec.mlflow.tracking_uri)).find_outcome(
                uid, meta["namespace"], previous.mlflow_run_id
            )
        except TrackingUriNotAllowed as refused:  # the allow-list changed since the create
            mlflow_error, mlflow_reason = str(refused), NOT_ALLOWED
        except MlflowError as error:
            MLFLOW_ERRORS.inc()
            mlflow_error, mlflow_reason = error.message, error.reason
    new = trainingrun_status(
        previous,
        rayjob_status=rayjob_status,
        rayjob_exists=exists,
        outcome=outcome,
        mlflow_error=mlflow_error,
        mlflow_checked=started,
        now=_now(),
        grace_seconds=SETTINGS.failed_job_grace_seconds,
        mlflow_reason=mlflow_reason or "Unreachable",
    )
    new.observed_generation = meta.get("generation")
    patch.status.update(status_patch(body.status, new))
    _announce_mlflow(body, previous.conditions, new.conditions)
    if new.phase != previous.phase:
        TRANSITIONS.labels("trainingrun", new.phase).inc()
        verdict = find_condition(new.conditions, SUCCEEDED)
        reason = verdict.reason if verdict else new.phase
        message = f"{new.phase}: {new.message}" if new.message else new.phase
        if new.phase == "Succeeded":
            message = (
                f"model version {new.model_version}, "
                f"{'promoted' if new.promoted else 'not promoted'}"
                + (f" ({new.promotion_reason})" if new.promotion_reason else "")
            )
        post(body, "Warning" if new.phase == "Failed" else "Normal", reason, message)


# --------------------------------------------------------------------------- ModelDeployment


def _desired_version(
    deployment: ModelDeployment,
    target: TrackingTarget,
    memo: kopf.Memo,
    conditions: list[Any],
    *,
    force: bool,
) -> tuple[int | None, list[Any]]:
    """The version to serve: pinned, or the alias resolved through MLflow (at most every
    alias_poll_seconds; None when unknown, which leaves the InferenceService as it is)."""
    selector, now = deployment.spec.model, _now()
    if selector.version is not None:
        conditions = set_condition(conditions, MODEL_RESOLVED, "True", "Pinned", "", now)
        return selector.version, conditions
    alias = selector.followed_alias or "champion"
    last = memo.get("alias_checked_at")
    fresh = last is not None and (now - last).total_seconds() < SETTINGS.alias_poll_seconds
    if not force and fresh and memo.get("alias") == alias:
        return memo.get("alias_version"), conditions
    try:
        version = _mlflow(target).resolve_alias(selector.name, alias)
    except MlflowError as error:
        MLFLOW_ERRORS.inc()
        conditions = set_condition(
            conditions, MLFLOW_REACHABLE, "False", error.reason, error.message, now
        )
        return memo.get("alias_version") if memo.get("alias") == alias else None, conditions
    memo["alias"], memo["alias_checked_at"], memo["alias_version"] = alias, now, version
    conditions = set_condition(conditions, MLFLOW_REACHABLE, "True", "Reachable", "", now)
    if version is None:
        message = f"registered model {selector.name} has no alias {alias!r} (yet)"
        conditions = set_condition(
            conditions, MODEL_RESOLVED, "False", "AliasNotFound", message, now
        )
    else:
        message = f"{alias} -> version {version}"
        conditions = set_condition(
            conditions, MODEL_RESOLVED, "True", "AliasResolved", message, now
        )
    return version, conditions


def _reconcile_deployment(
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    *,
    force_resolve: bool,
) -> None:
    deployment: ModelDeployment = _parse(ModelDeployment, body)
    previous: ModelDeploymentStatus = _status_of(ModelDeploymentStatus, body.status)
    try:
        target = _target(deployment.spec.mlflow.tracking_uri)
    except TrackingUriNotAllowed as refused:
        refusal = refused_deployment_status(previous, NOT_ALLOWED, str(refused), _now())
        refusal.observed_generation = meta.get("generation")
        patch.status.update(status_patch(body.status, refusal))
        if previous.phase != "Failed" or previous.message != refusal.message:
            post(body, "Warning", NOT_ALLOWED, str(refused))
        return
    working = previous.model_copy(deep=True)
    desired, working.conditions = _desired_version(
        deployment, target, memo, working.conditions, force=force_resolve
    )
    # Read, not indexed: a promotion or rollback must see the result of the previous
    # step, never a watch that lags behind it. ModelDeployments are few.
    isvc = kube.get(kube.INFERENCESERVICE, meta["namespace"], inferenceservice_name(meta["name"]))
    view = inferenceservice_view(isvc) if isvc is not None else None
    mode = (
        meta.annotations.get(ANNOTATION_DEPLOYMENT_MODE)
        or ((isvc or {}).get("metadata", {}).get("annotations") or {}).get(
            ANNOTATION_DEPLOYMENT_MODE
        )
        or SETTINGS.kserve_deployment_mode
    )
    rollout = plan_rollout(
        deployment,
        working,
        desired_version=desired,
        isvc=view,
        deployment_mode=mode,
        now=_now(),
        rollout_timeout_seconds=SETTINGS.rollout_timeout_seconds,
    )
    new = rollout.status
    if rollout.target_version is not None:
        manifest = build_inferenceservice(
            deployment,
            rollout.target_version,
            tracking_uri=target.uri,
            image=SETTINGS.predictor_image,
            http_port=SETTINGS.predictor_http_port,
            canary_traffic_percent=rollout.canary_traffic_percent,
            deployment_mode=mode,
        )
        kopf.adopt(manifest, owner=body)
        new.inference_service_name = manifest["metadata"]["name"]
        if isvc is None:
            kube.create_or_adopt(kube.INFERENCESERVICE, manifest, meta["uid"])
            CHILDREN_CREATED.labels("InferenceService").inc()
        else:
            predictor = manifest["spec"]["predictor"]
            current = (isvc.get("spec") or {}).get("predictor") or {}
            annotations = manifest["metadata"]["annotations"]
            current_annotations = isvc.get("metadata", {}).get("annotations") or {}
            canary_changed = "canaryTrafficPercent" in current and (
                "canaryTrafficPercent" not in predictor
            )
            if (
                not carries(current, predictor)
                or canary_changed
                or not carries(current_annotations, annotations)
            ):
                predictor = {"canaryTrafficPercent": None, **predictor}
                kube.patch(
                    kube.INFERENCESERVICE,
                    meta["namespace"],
                    manifest["metadata"]["name"],
                    {"metadata": {"annotations": annotations}, "spec": {"predictor": predictor}},
                )
    new.observed_generation = meta.get("generation")
    patch.status.update(status_patch(body.status, new))
    _announce_mlflow(body, previous.conditions, new.conditions)
    for event in rollout.events:
        post(body, event.type, event.reason, event.message)
    if new.phase != previous.phase:
        TRANSITIONS.labels("modeldeployment", new.phase).inc()


@kopf.on.create(*MODELDEPLOYMENTS)
@kopf.on.resume(*MODELDEPLOYMENTS)
@kopf.on.update(*MODELDEPLOYMENTS, field="spec")
@measured("modeldeployment", "change")
def deployment_changed(
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    _reconcile_deployment(body, meta, patch, memo, force_resolve=True)


@kopf.timer(*MODELDEPLOYMENTS, interval=SETTINGS.status_poll_seconds)
@measured("modeldeployment", "sync")
def sync_deployment(
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Follow the alias (resolved every alias_poll_seconds) and the InferenceService."""
    _reconcile_deployment(body, meta, patch, memo, force_resolve=False)
