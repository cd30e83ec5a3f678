"""TrainingRuns on a RayCluster that is already up (spec.ray.cluster): which one, the
operator's warm cluster per namespace and shape, and when an idle warm cluster goes. Pure.

KubeRay's RayJob names its cluster in `clusterSelector` by the label key `ray.io/cluster`
(the only key KubeRay reads); a label selector is resolved here, to a ready cluster. A warm
cluster is built like a run's own (rayjob.ray_cluster_spec: restricted pods, no token, the
MLflow client label and credentials) and owned by nothing, so it outlives the run; the
operator deletes it after `warm_cluster_idle_seconds` with no RayJob on it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from mlkube.api.trainingrun import TrainingRun
from mlkube.local import TELEMETRY_OFF_ENV
from mlkube.operator.conditions import parse_timestamp, timestamp
from mlkube.operator.names import MANAGED_BY, OPERATOR_NAME
from mlkube.operator.pods import CONTAINER_SECURITY_CONTEXT
from mlkube.operator.rayjob import (
    RAY_CLUSTER_SELECTOR_KEY,
    RAYJOB_API_VERSION,
    TRAIN_MODULE,
    ZYGOTE_MODULE,
    ZYGOTE_PRELOAD,
    ZYGOTE_SOCKET,
    ray_cluster_spec,
)

WARM_LABEL = "mlkube.io/warm-cluster"
LAST_USED = "mlkube.io/last-used"
WARM_PREFIX = "mlkube-warm-"
PREFECT_API_CONTAINER = "prefect-api"
PREFECT_API_PORT = 4200
PREFECT_API_URL = f"http://127.0.0.1:{PREFECT_API_PORT}/api"
PREFECT_API_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"cpu": "500m", "memory": "1Gi"},
}
# A RayJob in these deployment states no longer uses its cluster.
FINISHED_JOB_STATES = frozenset({"Complete", "Failed"})
# KubeRay's RayCluster state once its head (and minimum of workers) is up.
READY_STATE = "ready"


def prefect_api_container(image: str) -> dict[str, Any]:
    """Prefect's API beside the warm head, on the pod's loopback only: the train flow of
    every run finds it running instead of starting a temporary one of its own (about 10 s
    before each search). Its readiness keeps the head, and so the cluster, not ready until
    it answers. Restricted like the rest of the pod."""
    probe = f"import urllib.request; urllib.request.urlopen('{PREFECT_API_URL}/health', timeout=2)"
    return {
        "name": PREFECT_API_CONTAINER,
        "image": image,
        "command": ["prefect", "server", "start", "--host", "127.0.0.1",
                    "--port", str(PREFECT_API_PORT), "--no-ui", "--no-services"],
        "env": [{"name": k, "value": v} for k, v in sorted(TELEMETRY_OFF_ENV.items())],
        "resources": PREFECT_API_RESOURCES,
        "readinessProbe": {
            "exec": {"command": ["python", "-c", probe]},
            "periodSeconds": 2,
            "timeoutSeconds": 5,
        },
        "securityContext": dict(CONTAINER_SECURITY_CONTEXT),
    }  # fmt: skip


def zygote_start() -> str:
    """The warm head's container arguments: the train flow's zygote started in the
    background (imported once, then forked for each run's entrypoint). KubeRay runs them in
    bash before its own `ulimit -n 65536; ray start ...` (joined with `&&`), so the braces:
    a command that ends in `&` can't be followed by `&&`. The limit is raised first so that
    the runs have the one a plain driver under `ray start` would have (quietly: where the
    hard limit is lower, KubeRay's own `ulimit` reports it)."""
    preload = " ".join(f"--preload {name}" for name in ZYGOTE_PRELOAD)
    serve = f"python -m {ZYGOTE_MODULE} serve --socket {ZYGOTE_SOCKET} {preload}"
    return f"ulimit -n 65536 2>/dev/null; {{ {serve} {TRAIN_MODULE} & }}"


def warm_cluster_spec(run: TrainingRun, credentials_secret: str) -> dict[str, Any]:
    """The spec of the warm cluster a run asks for: a run's own cluster, plus Prefect's API
    beside the head, which the head's processes (the train flow's driver) are pointed at,
    and the train flow's zygote in the head."""
    spec = ray_cluster_spec(run, credentials_secret)
    pod = spec["headGroupSpec"]["template"]["spec"]
    head = pod["containers"][0]
    head["env"] = [*head["env"], {"name": "PREFECT_API_URL", "value": PREFECT_API_URL}]
    head["args"] = [zygote_start()]
    pod["containers"] = [head, prefect_api_container(head["image"])]
    return spec


def warm_cluster_name(spec: dict[str, Any]) -> str:
    """One warm cluster per namespace and shape: runs asking the same get the same one."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return WARM_PREFIX + digest[:12]


def build_warm_raycluster(
    run: TrainingRun, credentials_secret: str, now: dt.datetime
) -> dict[str, Any]:
    spec = warm_cluster_spec(run, credentials_secret)
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayCluster",
        "metadata": {
            "name": warm_cluster_name(spec),
            "namespace": run.metadata.namespace,
            "labels": {MANAGED_BY: OPERATOR_NAME, WARM_LABEL: "true"},
            "annotations": {LAST_USED: timestamp(now)},
        },
        "spec": spec,
    }


def cluster_images(cluster: dict[str, Any]) -> list[str]:
    """Every container image of the cluster's head and worker groups."""
    spec = cluster.get("spec") or {}
    templates = [(spec.get("headGroupSpec") or {}).get("template") or {}]
    templates += [(g or {}).get("template") or {} for g in spec.get("workerGroupSpecs") or []]
    return [
        container.get("image", "")
        for template in templates
        for container in (template.get("spec") or {}).get("containers") or []
    ]


def is_ready(cluster: dict[str, Any]) -> bool:
    return (cluster.get("status") or {}).get("state") == READY_STATE and not cluster.get(
        "metadata", {}
    ).get("deletionTimestamp")


def pick_cluster(clusters: Iterable[dict[str, Any]]) -> str | None:
    """The first ready cluster by name, of those a selector listed."""
    ready = sorted(c["metadata"]["name"] for c in clusters if is_ready(c))
    return ready[0] if ready else None


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def jobs_on(name: str, rayjobs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        job
        for job in rayjobs
        if ((job.get("spec") or {}).get("clusterSelector") or {}).get(RAY_CLUSTER_SELECTOR_KEY)
        == name
    ]


def warm_cluster_action(
    cluster: dict[str, Any],
    rayjobs: Iterable[dict[str, Any]],
    now: dt.datetime,
    idle_seconds: float,
) -> str:
    """ "busy" (a RayJob runs on it: its last use is now), "idle" (none for idle_seconds
    since the last use: delete it) or "keep". The last use is the latest of the annotation
    the operator writes, the end of RayJobs on it, and its creation."""
    jobs = jobs_on(cluster["metadata"]["name"], rayjobs)
    if any((job.get("status") or {}).get("jobDeploymentStatus") not in FINISHED_JOB_STATES
           for job in jobs):  # fmt: skip
        return "busy"
    meta = cluster["metadata"]
    moments = [
        parse_timestamp((meta.get("annotations") or {}).get(LAST_USED)),
        parse_timestamp(meta.get("creationTimestamp")),
        *(parse_timestamp((job.get("status") or {}).get("endTime")) for job in jobs),
    ]
    last = max((m for m in moments if m is not None), default=None)
    if last is None or (now - last).total_seconds() >= idle_seconds:
        return "idle"
    return "keep"
