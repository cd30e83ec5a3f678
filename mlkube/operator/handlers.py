"""kopf handlers: thin. Read the objects, call the pure builders and decisions, write back.

    kopf run --standalone --all-namespaces -m mlkube.operator.handlers
or  python -m mlkube.operator

No handler here needs a finalizer: the periodic status syncs run in one operator-wide
poller (mlkube/operator/poller.py) rather than as kopf timers, so deleting a TrainingRun,
a ModelDeployment or their namespace never waits for the operator.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from mlkube.api.common import GROUP, VERSION
from mlkube.api.manifest import format_validation_error
from mlkube.api.modeldeployment import ModelDeployment, ModelDeploymentStatus
from mlkube.api.trainingrun import TERMINAL_PHASES, TrainingRun, TrainingRunStatus
from mlkube.operator import kube
from mlkube.operator.conditions import timestamp
from mlkube.operator.events import Event, mlflow_events
from mlkube.operator.inferenceservice import (
    deployment_mode,
    inferenceservice_for,
    inferenceservice_patch,
    predictor_pod_selector,
)
from mlkube.operator.metrics import CHILDREN_CREATED, TRANSITIONS, measured
from mlkube.operator.mlflow_reader import GuardedReader, MlflowError, reader_for
from mlkube.operator.models_rollout import follow_deployment, plan_deployment
from mlkube.operator.names import (
    MANAGED_BY,
    OPERATOR_NAME,
    inferenceservice_name,
    rayjob_name,
)
from mlkube.operator.policy import (
    RAY_CLUSTER_NOT_FOUND,
    WARM_CLUSTERS_OFF,
    Refusal,
    deployment_refusal,
    raycluster_refusal,
    trainingrun_refusal,
)
from mlkube.operator.poller import KeyedLocks, Poller
from mlkube.operator.rayclusters import (
    LAST_USED,
    WARM_LABEL,
    build_warm_raycluster,
    cluster_images,
    label_selector,
    pick_cluster,
    warm_cluster_action,
)
from mlkube.operator.rayjob import rayjob_for
from mlkube.operator.rollout import (
    DeploymentMemo,
    refused_deployment_status,
)
from mlkube.operator.settings import get_settings
from mlkube.operator.status import (
    failed_to_load,
    inferenceservice_view,
    phase_event,
    rayjob_created_status,
    refused_trainingrun_status,
    status_patch,
    trainingrun_status,
)
from mlkube.operator.tracking import (
    NOT_ALLOWED,
    TrackingTarget,
    TrackingUriNotAllowed,
    tracking_target,
)
from mlkube.training.ownership import NOT_OWNER

TRAININGRUNS = (GROUP, VERSION, "trainingruns")
MODELDEPLOYMENTS = (GROUP, VERSION, "modeldeployments")
OURS = {MANAGED_BY: OPERATOR_NAME}
SETTINGS = get_settings()
LOG = logging.getLogger("mlkube.operator")
ObjectKey = tuple[str, str]  # (namespace, name)


class Update(BaseModel):
    """What one reconcile of an object writes: a merge patch of its status, and Events."""

    status: dict[str, Any] = {}
    events: list[Event] = []


# Per object (by uid): what the ModelDeployment reconcile remembers between runs, and one
# lock so that a change handler and the poller never reconcile an object at once.
_memos: dict[str, DeploymentMemo] = {}
_locks = KeyedLocks()
_pollers: list[Poller[ObjectKey]] = []


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere $KUBECONFIG (mlkube.kube_config)."""
    return kube.connection_info(settings)


# (type: ignore: kopf's handler protocols do not know the index kwargs.)
@kopf.on.startup()  # type: ignore[arg-type]
async def configure(
    settings: kopf.OperatorSettings,
    trainingruns_to_sync: kopf.Index[ObjectKey, str],
    deployments_to_sync: kopf.Index[ObjectKey, str],
    rayjobs_by_owner: kopf.Index[str, Any],
    warm_clusters: kopf.Index[ObjectKey, str],
    **_: Any,
) -> None:
    kube.configure()
    # kopf would post each "Handler succeeded" log line as an Event; only its warnings go
    # out, our transitions are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = SETTINGS.max_workers
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 10

    def deployments() -> list[ObjectKey]:
        live = list(deployments_to_sync)
        uids = {uid for key in live for uid in deployments_to_sync.get(key, [])}
        for uid in [u for u in _memos if u not in uids]:
            del _memos[uid]  # deleted: forget what was remembered for it
        _locks.forget_all_but([*uids, *(u for k in trainingruns_to_sync for u in
                                        trainingruns_to_sync.get(k, []))])  # fmt: skip
        return live

    def poll_with_index(key: ObjectKey) -> None:
        poll_trainingrun(key, rayjobs_by_owner)

    interval = SETTINGS.status_poll_seconds
    _pollers[:] = [
        Poller("trainingrun-sync", interval, lambda: list(trainingruns_to_sync), poll_with_index),
        Poller("modeldeployment-sync", interval, deployments, poll_deployment),
        Poller(
            "warm-clusters", max(interval, 10.0), lambda: list(warm_clusters), reap_warm_cluster
        ),
    ]
    for poller in _pollers:
        poller.start(settings.execution.executor)


@kopf.on.cleanup()
async def stop_polling(**_: Any) -> None:
    for poller in _pollers:
        await poller.stop()


# --------------------------------------------------------------------------- shared


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(model: type[BaseModel], body: Mapping[str, Any]) -> Any:
    """The custom resource as our pydantic model; the CRD schema has let it in, so a
    failure here is a bug or a schema drift: permanent, with the field named."""
    document = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body["metadata"]),
        "spec": dict(body["spec"]),
    }
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise kopf.PermanentError(f"invalid spec: {format_validation_error(error)}") from None


def _status_of(model: type[BaseModel], status: Any) -> Any:
    """The current status, tolerant of fields this version does not know (kopf's own)."""
    known = {field.alias or name for name, field in model.model_fields.items()}
    try:
        return model.model_validate({k: v for k, v in (status or {}).items() if k in known})
    except ValidationError:
        return model()


def _log_event(body: Mapping[str, Any], event: Event) -> None:
    level = logging.WARNING if event.type == "Warning" else logging.INFO
    meta = body["metadata"]
    LOG.log(level, "%s %s/%s: %s: %s", body.get("kind"), meta.get("namespace"), meta.get("name"),
            event.reason, event.message)  # fmt: skip


def apply_in_handler(body: kopf.Body, patch: kopf.Patch, update: Update) -> None:
    """An Update from within a kopf handler: kopf writes the status and posts the Events."""
    patch.status.update(update.status)
    for event in update.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        _log_event(body, event)


def apply_by_api(kind: kube.Kind, obj: dict[str, Any], update: Update) -> None:
    """An Update from the poller (outside kopf's handlers): straight to the API."""
    meta = obj["metadata"]
    if update.status:
        kube.patch_status(kind, meta["namespace"], meta["name"], update.status)
    for event in update.events:
        kube.post_event(obj, event.type, event.reason, event.message)
        _log_event(obj, event)


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


def _owner_uids(meta: kopf.Meta, kind: str) -> list[str]:
    refs = meta.get("ownerReferences") or []
    return [ref["uid"] for ref in refs if ref.get("kind") == kind and ref.get("uid")]


# --------------------------------------------------------------------------- indexes
# In-memory views kept current by kopf's watches: the objects the poller syncs, and our
# RayJobs' status (read instead of asking the API server every few seconds for each).


@kopf.index("ray.io", "v1", "rayjobs", labels=OURS)
def rayjobs_by_owner(meta: kopf.Meta, status: kopf.Status, **_: Any) -> dict[str, Any]:
    return {uid: dict(status) for uid in _owner_uids(meta, "TrainingRun")}


def _trainingrun_active(status: Any) -> bool:
    return (status or {}).get("phase") not in TERMINAL_PHASES and bool(
        (status or {}).get("rayJobName")
    )


@kopf.index("ray.io", "v1", "rayclusters", labels={**OURS, WARM_LABEL: "true"})
def warm_clusters(namespace: str | None, name: str, uid: str, **_: Any) -> dict[ObjectKey, str]:
    """The operator's warm RayClusters: each is deleted once idle (reap_warm_cluster)."""
    return {(namespace or "", name): uid}


@kopf.index(*TRAININGRUNS)
def trainingruns_to_sync(
    namespace: str | None, name: str, uid: str, status: kopf.Status, **_: Any
) -> dict[ObjectKey, str]:
    """TrainingRuns whose RayJob runs: their status follows it and MLflow."""
    return {(namespace or "", name): uid} if _trainingrun_active(status) else {}


@kopf.index(*MODELDEPLOYMENTS)
def deployments_to_sync(
    namespace: str | None, name: str, uid: str, **_: Any
) -> dict[ObjectKey, str]:
    """Every ModelDeployment: it follows its alias and its InferenceService."""
    return {(namespace or "", name): uid}


def _first(index: kopf.Index[str, Any], key: str) -> Any | None:
    return next(iter(index.get(key, [])), None)


def _refusal_status(
    refuse: Callable[..., Any], previous: Any, refusal: Refusal, generation: Any
) -> Any:
    """The status `refuse` (refused_trainingrun_status or refused_deployment_status) makes."""
    new = refuse(previous, refusal.reason, refusal.message, _now())
    new.observed_generation = generation
    return new


# --------------------------------------------------------------------------- TrainingRun


def _trainingrun_refusal(run: TrainingRun) -> Refusal | None:
    """What the admin does not allow in this TrainingRun, or None."""
    try:
        _target(run.spec.mlflow.tracking_uri)
    except TrackingUriNotAllowed as refused:
        return Refusal(reason=NOT_ALLOWED, message=str(refused))
    return trainingrun_refusal(run, SETTINGS)


@kopf.on.create(*TRAININGRUNS)
@measured("trainingrun", "create")
def create_rayjob(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    """Create (or adopt, after a restart) the one RayJob of this TrainingRun."""
    run: TrainingRun = _parse(TrainingRun, body)
    previous: TrainingRunStatus = _status_of(TrainingRunStatus, body.status)
    refusal = _trainingrun_refusal(run)
    if refusal is not None:  # nothing is created
        new = _refusal_status(refused_trainingrun_status, previous, refusal, meta.get("generation"))
        event = Event(type="Warning", reason=refusal.reason, message=refusal.message)
        apply_in_handler(body, patch, Update(status=status_patch(body.status, new), events=[event]))
        return
    cluster_name, refusal = _choose_cluster(run)
    if refusal is not None:  # nothing is created
        new = _refusal_status(refused_trainingrun_status, previous, refusal, meta.get("generation"))
        event = Event(type="Warning", reason=refusal.reason, message=refusal.message)
        apply_in_handler(body, patch, Update(status=status_patch(body.status, new), events=[event]))
        return
    manifest = rayjob_for(run, SETTINGS, cluster_name=cluster_name)
    kopf.adopt(manifest, owner=body)
    _, created = kube.create_or_adopt(kube.RAYJOB, manifest, meta["uid"])
    name = manifest["metadata"]["name"]
    if created:
        CHILDREN_CREATED.labels("RayJob").inc()
        event = Event(reason="RayJobCreated", message=f"created RayJob {name}")
    else:
        event = Event(reason="RayJobAdopted", message=f"RayJob {name} already existed")
    new = rayjob_created_status(previous, name, run.spec.tuning.num_trials, _now())
    new.observed_generation = meta.get("generation")
    apply_in_handler(body, patch, Update(status=status_patch(body.status, new), events=[event]))


def _choose_cluster(run: TrainingRun) -> tuple[str | None, Refusal | None]:
    """The existing RayCluster spec.ray.cluster asks for (None: a cluster of the run's
    own), or why not. A warm cluster is made here when missing, and marked used."""
    choice, namespace = run.spec.ray.cluster, run.metadata.namespace or ""
    if choice is None:
        return None, None
    if choice.warm:
        if SETTINGS.warm_cluster_idle_seconds <= 0:
            return None, Refusal(
                reason=WARM_CLUSTERS_OFF,
                message="spec.ray.cluster.warm: warm clusters are off "
                "(operator.warmClusterIdleSeconds is 0)",
            )
        manifest = build_warm_raycluster(run, SETTINGS.mlflow_credentials_secret, _now())
        name = manifest["metadata"]["name"]
        found, created = kube.create(kube.RAYCLUSTER, manifest)
        if not created:  # marked used, so that the idle reaper leaves it (or fails to delete)
            found = kube.patch(
                kube.RAYCLUSTER,
                namespace,
                name,
                {"metadata": {"annotations": {LAST_USED: timestamp(_now())}}},
            )
        if found["metadata"].get("deletionTimestamp"):
            raise kopf.TemporaryError(f"warm RayCluster {name} is being deleted", delay=5)
        return name, None
    if choice.name is not None:
        field, name = "spec.ray.cluster.name", choice.name
        cluster = kube.get(kube.RAYCLUSTER, namespace, name)
        if cluster is None:
            message = f"{field}: no RayCluster {name!r} in namespace {namespace!r}"
            return None, Refusal(reason=RAY_CLUSTER_NOT_FOUND, message=message)
    else:
        field, labels = "spec.ray.cluster.selector", label_selector(choice.selector or {})
        clusters = kube.list_objects(kube.RAYCLUSTER, namespace, labels)
        picked = pick_cluster(clusters)
        if picked is None:
            message = f"{field}: no ready RayCluster in namespace {namespace!r} has {labels}"
            return None, Refusal(reason=RAY_CLUSTER_NOT_FOUND, message=message)
        name = picked
        cluster = next(c for c in clusters if c["metadata"]["name"] == picked)
    refusal = raycluster_refusal(field, name, cluster_images(cluster), SETTINGS)
    return (None, refusal) if refusal else (name, None)


def reap_warm_cluster(key: ObjectKey) -> None:
    """A warm RayCluster with no RayJob on it for warm_cluster_idle_seconds is deleted
    (unless it was used meanwhile: the delete is conditional on what was read)."""
    namespace, name = key
    cluster = kube.get(kube.RAYCLUSTER, namespace, name)
    if cluster is None or cluster["metadata"].get("deletionTimestamp"):
        return
    rayjobs = kube.list_objects(kube.RAYJOB, namespace)
    action = warm_cluster_action(cluster, rayjobs, _now(), SETTINGS.warm_cluster_idle_seconds)
    if action == "busy":
        kube.patch(kube.RAYCLUSTER, namespace, name,
                   {"metadata": {"annotations": {LAST_USED: timestamp(_now())}}})  # fmt: skip
    elif action == "idle":
        version = cluster["metadata"].get("resourceVersion")
        if kube.delete(kube.RAYCLUSTER, namespace, name, resource_version=version):
            LOG.info("warm RayCluster %s/%s idle: deleted", namespace, name)


def sync_trainingrun(body: dict[str, Any], rayjob_status: dict[str, Any] | None) -> Update:
    """RayJob status (None: not in the index) + the MLflow parent run -> TrainingRun status."""
    meta = body["metadata"]
    previous: TrainingRunStatus = _status_of(TrainingRunStatus, body.get("status"))
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
                meta["uid"], meta["namespace"], previous.mlflow_run_id
            )
        except TrackingUriNotAllowed as refused:  # the allow-list changed since the create
            mlflow_error, mlflow_reason = str(refused), NOT_ALLOWED
        except MlflowError as error:
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
    events = mlflow_events(previous.conditions, new.conditions)
    if new.phase != previous.phase:
        TRANSITIONS.labels("trainingrun", new.phase).inc()
        events.append(phase_event(new))
    return Update(status=status_patch(body.get("status") or {}, new), events=events)


@measured("trainingrun", "sync")
def poll_trainingrun(key: ObjectKey, rayjobs: kopf.Index[str, Any]) -> None:
    """One poll of a running TrainingRun, read fresh from the API server."""
    body = kube.get(kube.TRAININGRUN, *key)
    if body is None or not _trainingrun_active(body.get("status")):
        return
    uid = body["metadata"]["uid"]
    with _locks.hold(uid):
        apply_by_api(kube.TRAININGRUN, body, sync_trainingrun(body, _first(rayjobs, uid)))


# --------------------------------------------------------------------------- ModelDeployment


def _refused_deployment(
    body: dict[str, Any], previous: ModelDeploymentStatus, refusal: Refusal
) -> Update:
    """Failed with the refusal's reason; the InferenceService (if any) is left as it is."""
    generation = body["metadata"].get("generation")
    new = _refusal_status(refused_deployment_status, previous, refusal, generation)
    events = []
    if previous.phase != "Failed" or previous.message != new.message:
        events.append(Event(type="Warning", reason=refusal.reason, message=refusal.message))
    return Update(status=status_patch(body.get("status") or {}, new), events=events)


def reconcile_deployment(
    body: dict[str, Any], memo: DeploymentMemo, *, force_resolve: bool
) -> Update:
    meta = body["metadata"]
    deployment: ModelDeployment = _parse(ModelDeployment, body)
    previous: ModelDeploymentStatus = _status_of(ModelDeploymentStatus, body.get("status"))
    try:
        target = _target(deployment.spec.mlflow.tracking_uri)
    except TrackingUriNotAllowed as refused:
        return _refused_deployment(
            body, previous, Refusal(reason=NOT_ALLOWED, message=str(refused))
        )
    refusal = deployment_refusal(deployment, SETTINGS)
    if refusal is not None:
        return _refused_deployment(body, previous, refusal)
    working = previous.model_copy(deep=True)
    followed = follow_deployment(
        deployment, _mlflow(target), memo, working.conditions, now=_now(),
        poll_seconds=SETTINGS.alias_poll_seconds, shared=SETTINGS.allow_shared_models,
        force=force_resolve,
    )  # fmt: skip
    working.conditions = followed.conditions
    if followed.refusal is not None:
        refusal = Refusal(reason=NOT_OWNER, message=followed.refusal)
        return _refused_deployment(body, previous, refusal)
    # Read, not indexed: a promotion or rollback must see the result of the previous
    # step, never a watch that lags behind it. ModelDeployments are few.
    isvc_name = inferenceservice_name(meta["name"])
    isvc = kube.get(kube.INFERENCESERVICE, meta["namespace"], isvc_name)
    view = inferenceservice_view(isvc) if isvc is not None else None
    if view is not None and view.state == "Progressing" and view.version is not None:
        view = failed_to_load(view, _predictor_pods(meta["namespace"], isvc_name, view.version))
    mode = deployment_mode(deployment, isvc, SETTINGS.kserve_deployment_mode)
    plan = plan_deployment(
        deployment,
        working,
        followed,
        isvc=view,
        deployment_mode=mode,
        now=_now(),
        rollout_timeout_seconds=SETTINGS.rollout_timeout_seconds,
    )
    new, pinned = plan.status, plan.pinned
    if pinned is not None:
        manifest = inferenceservice_for(
            deployment,
            pinned,
            SETTINGS,
            tracking_uri=target.uri,
            canary_traffic_percent=plan.canary_traffic_percent,
            deployment_mode=mode,
        )
        kopf.adopt(manifest, owner=kopf.Body(cast(kopf.RawBody, body)))
        new.inference_service_name = manifest["metadata"]["name"]
        if isvc is None:
            kube.create_or_adopt(kube.INFERENCESERVICE, manifest, meta["uid"])
            CHILDREN_CREATED.labels("InferenceService").inc()
        else:
            _update_inferenceservice(isvc, manifest)
    new.observed_generation = meta.get("generation")
    events = mlflow_events(previous.conditions, new.conditions) + list(plan.events)
    if new.phase != previous.phase:
        TRANSITIONS.labels("modeldeployment", new.phase).inc()
    return Update(status=status_patch(body.get("status") or {}, new), events=events)


def _predictor_pods(namespace: str, isvc_name: str, version: int) -> list[dict[str, Any]]:
    """The pods serving `version`; none when the operator may not list pods (a chart from
    before it needed to), so that the rollout timeout still decides."""
    try:
        return kube.list_pods(namespace, predictor_pod_selector(isvc_name, version))
    except ApiException as error:
        if error.status != 403:
            raise
        LOG.warning("listing pods in %s refused (403): the chart's RBAC is older", namespace)
        return []


def _update_inferenceservice(isvc: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Patch the InferenceService where it says other than the manifest."""
    body = inferenceservice_patch(isvc, manifest)
    if body is not None:
        meta = manifest["metadata"]
        kube.patch(kube.INFERENCESERVICE, meta["namespace"], meta["name"], body)


def _memo(uid: str) -> DeploymentMemo:
    return _memos.setdefault(uid, DeploymentMemo())


@kopf.on.create(*MODELDEPLOYMENTS)
@kopf.on.resume(*MODELDEPLOYMENTS)
@kopf.on.update(*MODELDEPLOYMENTS, field="spec")
@measured("modeldeployment", "change")
def deployment_changed(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    with _locks.hold(meta["uid"]):
        update = reconcile_deployment(dict(body), _memo(meta["uid"]), force_resolve=True)
    apply_in_handler(body, patch, update)


@measured("modeldeployment", "sync")
def poll_deployment(key: ObjectKey) -> None:
    """Follow the alias (resolved every alias_poll_seconds) and the InferenceService."""
    body = kube.get(kube.MODELDEPLOYMENT, *key)
    if body is None:
        return
    uid = body["metadata"]["uid"]
    with _locks.hold(uid):
        apply_by_api(
            kube.MODELDEPLOYMENT, body, reconcile_deployment(body, _memo(uid), force_resolve=False)
        )
