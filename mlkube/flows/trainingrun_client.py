"""The retrain flow's cluster side: create the TrainingRun, wait for the operator to report
a terminal phase, and read its outcome from the status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from mlkube.api.common import GROUP, VERSION
from mlkube.api.trainingrun import TERMINAL_PHASES
from mlkube.flows.retrain_models import ClusterSettings, RetrainFailed, TrainingOutcome

PLURAL = "trainingruns"


@task(name="submit-trainingrun", cache_policy=NO_CACHE)
def submit_trainingrun(body: dict[str, Any], namespace: str) -> str:
    from kubernetes import client

    from mlkube.kube_config import api_client

    with api_client() as api:
        try:
            created = cast(
                dict[str, Any],
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, body
                ),
            )
        except client.exceptions.ApiException as error:
            raise RetrainFailed(
                f"cannot create a TrainingRun in {namespace}: {error.status} {error.reason}"
            ) from None
    name = str(created["metadata"]["name"])
    get_run_logger().info("created TrainingRun %s/%s", namespace, name)
    return name


@task(name="wait-for-trainingrun", cache_policy=NO_CACHE)
def wait_for_trainingrun(name: str, namespace: str, settings: ClusterSettings) -> dict[str, Any]:
    """The TrainingRun once its phase is terminal; RetrainFailed after the timeout."""
    from kubernetes import client

    from mlkube.kube_config import api_client

    deadline = time.monotonic() + settings.timeout_seconds
    phase = None
    with api_client() as api:
        custom = client.CustomObjectsApi(api)
        while True:
            found = cast(
                dict[str, Any],
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
            status = found.get("status") or {}
            if status.get("phase") != phase:
                phase = status.get("phase")
                get_run_logger().info("TrainingRun %s: %s", name, phase or "no status yet")
            if phase in TERMINAL_PHASES:
                return found
            if time.monotonic() > deadline:
                raise RetrainFailed(
                    f"TrainingRun {namespace}/{name} is still {phase or 'Pending'} after "
                    f"{settings.timeout_seconds:g} s (it keeps running; see kubectl get tr)"
                )
            time.sleep(settings.poll_seconds)


def outcome_from_status(found: dict[str, Any]) -> TrainingOutcome:
    status = found.get("status") or {}
    best = status.get("best") or {}
    return TrainingOutcome(
        trainingrun=found["metadata"]["name"],
        namespace=found["metadata"].get("namespace"),
        phase=status.get("phase", "Pending"),
        model_name=found["spec"]["model"]["name"],
        model_version=status.get("modelVersion"),
        promoted=status.get("promoted"),
        promotion_reason=status.get("promotionReason"),
        metric=best.get("metric"),
        best_value=best.get("value"),
        message=status.get("message"),
    )


def train_on_cluster(
    body: dict[str, Any], settings: ClusterSettings, on_submitted: Callable[[], None]
) -> TrainingOutcome:
    from mlkube.kube_config import current_namespace

    namespace = settings.namespace or current_namespace()
    name = submit_trainingrun(body, namespace)
    on_submitted()
    try:
        found = wait_for_trainingrun(name, namespace, settings)
    except RetrainFailed as error:
        model = body["spec"]["model"]["name"]
        return TrainingOutcome(
            trainingrun=name, namespace=namespace, phase="Timeout", model_name=model,
            message=str(error),
        )  # fmt: skip
    return outcome_from_status(found)
