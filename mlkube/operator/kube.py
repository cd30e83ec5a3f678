"""The few Kubernetes API calls the handlers make, on the official client."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from mlkube import kube_config

FIELD_MANAGER = "mlkube-operator"

_api: client.ApiClient | None = None
_lock = threading.Lock()


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str


RAYJOB = Kind("ray.io", "v1", "rayjobs", "RayJob")
RAYCLUSTER = Kind("ray.io", "v1", "rayclusters", "RayCluster")
INFERENCESERVICE = Kind("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
TRAININGRUN = Kind("mlkube.io", "v1alpha1", "trainingruns", "TrainingRun")
MODELDEPLOYMENT = Kind("mlkube.io", "v1alpha1", "modeldeployments", "ModelDeployment")


def configure() -> None:
    """The client of the calls below, by mlkube's one rule (mlkube.kube_config)."""
    global _api
    with _lock:
        _api = kube_config.api_client()


def connection_info(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """kopf's credentials by the same rule as the client's; None when there are none (kopf
    then stops: no credentials). Read anew at each login, so a rotated token is picked up.

    kopf.login_via_client translates the same way, but reads the kubeconfig path that the
    kubernetes client fixed when it was imported.
    """
    try:
        configuration = kube_config.client_configuration()
    except config.ConfigException:
        return None
    # The client keeps "Bearer <token>" under BearerToken (kubernetes >= 36) or authorization.
    header = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        default_namespace=kube_config.current_namespace(),
        trust_env=settings.networking.trust_env,
    )


def _custom() -> client.CustomObjectsApi:
    if _api is None:
        configure()
    return client.CustomObjectsApi(_api)


def _core() -> client.CoreV1Api:
    if _api is None:
        configure()
    return client.CoreV1Api(_api)


def get(kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found = _custom().get_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name
        )
        return cast(dict[str, Any], found)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def list_objects(kind: Kind, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
    """The objects of one namespace (those with the labels, when given)."""
    found = cast(
        dict[str, Any],
        _custom().list_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, label_selector=label_selector
        ),
    )
    return cast(list[dict[str, Any]], found.get("items", []))


def list_pods(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    """The pods of one namespace with these labels, as plain dicts (camelCase keys)."""
    core = _core()
    found = core.list_namespaced_pod(namespace, label_selector=label_selector)
    items: list[dict[str, Any]] = core.api_client.sanitize_for_serialization(found)["items"]
    return items


def create(kind: Kind, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create the object; (the existing one, False) if its name is taken."""
    meta = manifest["metadata"]
    try:
        created = _custom().create_namespaced_custom_object(
            kind.group, kind.version, meta["namespace"], kind.plural, manifest,
            field_manager=FIELD_MANAGER,
        )  # fmt: skip
        return cast(dict[str, Any], created), True
    except ApiException as error:
        if error.status != 409:
            raise
    existing = get(kind, meta["namespace"], meta["name"])
    if existing is None:
        raise kopf.TemporaryError(f"{kind.kind} {meta['name']} was being deleted", delay=2)
    return existing, False


def delete(kind: Kind, namespace: str, name: str, resource_version: str | None = None) -> bool:
    """Delete (in the background: its dependents go with it), only if it is still at
    `resource_version` when given. False if it changed meanwhile; gone already is no error."""
    options = client.V1DeleteOptions(
        propagation_policy="Background",
        preconditions=client.V1Preconditions(resource_version=resource_version)
        if resource_version
        else None,
    )
    try:
        _custom().delete_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name, body=options
        )
    except ApiException as error:
        if error.status == 409:
            return False
        if error.status != 404:
            raise
    return True


def patch(kind: Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (a None value removes a field; lists are replaced whole)."""
    patched = _custom().patch_namespaced_custom_object(
        kind.group, kind.version, namespace, kind.plural, name, body, field_manager=FIELD_MANAGER
    )
    return cast(dict[str, Any], patched)


def patch_status(kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> None:
    """JSON merge patch of the status subresource; an object gone meanwhile is no error."""
    try:
        _custom().patch_namespaced_custom_object_status(
            kind.group, kind.version, namespace, kind.plural, name, {"status": status},
            field_manager=FIELD_MANAGER,
        )  # fmt: skip
    except ApiException as error:
        if error.status != 404:
            raise


def post_event(obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """A core/v1 Event on `obj`, as kopf posts them from its handlers (outside a handler,
    kopf's own poster is not there)."""
    meta = obj["metadata"]
    now = dt.datetime.now(dt.UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}."),
        involved_object=client.V1ObjectReference(
            api_version=obj.get("apiVersion"),
            kind=obj.get("kind"),
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
        ),  # fmt: skip
        reason=reason,
        message=message[:1024],
        type=kind,
        source=client.V1EventSource(component=FIELD_MANAGER),
        first_timestamp=now,
        last_timestamp=now,
        count=1,
    )
    _core().create_namespaced_event(meta["namespace"], event)


def _owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in refs)


def create_or_adopt(
    kind: Kind, manifest: dict[str, Any], owner_uid: str
) -> tuple[dict[str, Any], bool]:
    """Create the child; on 409 take the existing one if it is ours or nobody's.

    Returns (object, created). A child of the same name that belongs to another owner
    (say, a deleted TrainingRun's RayJob that the garbage collector has not removed yet)
    is a temporary error: kopf retries later.
    """
    meta = manifest["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    existing, created = create(kind, manifest)
    if created:
        return existing, True
    if _owned_by(existing, owner_uid):
        return existing, False
    controllers = [
        ref for ref in existing["metadata"].get("ownerReferences") or [] if ref.get("controller")
    ]
    if controllers:
        raise kopf.TemporaryError(
            f"{kind.kind} {name} belongs to {controllers[0].get('kind')} "
            f"{controllers[0].get('name')} (uid {controllers[0].get('uid')}); waiting for it to go",
            delay=5,
        )
    refs = [*(existing["metadata"].get("ownerReferences") or []), *meta["ownerReferences"]]
    return patch(kind, namespace, name, {"metadata": {"ownerReferences": refs}}), False
