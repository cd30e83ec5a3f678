"""TrainingRuns on a RayCluster that is already up (spec.ray.cluster): the RayJob that names
it, the operator's warm cluster per namespace and shape, which cluster a selector picks,
the policy on the cluster's images, and when an idle warm cluster goes."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from typing import Any

import pytest

from mlkube.api import ManifestError, TrainingRun, parse_resource
from mlkube.flows.zygote import Request, refusal
from mlkube.flows.zygote import build_parser as zygote_parser
from mlkube.operator.policy import IMAGE_NOT_ALLOWED, raycluster_refusal
from mlkube.operator.rayclusters import (
    LAST_USED,
    WARM_LABEL,
    build_warm_raycluster,
    cluster_images,
    pick_cluster,
    warm_cluster_action,
    zygote_start,
)
from mlkube.operator.rayjob import ZYGOTE_SOCKET, build_rayjob, ray_cluster_spec
from mlkube.operator.settings import OperatorSettings

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def run(namespace: str = "ml", **ray: Any) -> TrainingRun:
    return TrainingRun.model_validate({
        "metadata": {"name": "ins", "namespace": namespace, "uid": "u-1"},
        "spec": {"task": "insurance", "model": {"name": "insurance"}, "ray": ray},
    })  # fmt: skip


def test_a_rayjob_on_an_existing_cluster_names_it_and_brings_no_cluster_of_its_own() -> None:
    job = build_rayjob(run(cluster={"name": "shared"}), "http://mlflow:5000",
                       cluster_name="shared")  # fmt: skip
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert "rayClusterSpec" not in spec and "shutdownAfterJobFinishes" not in spec
    # KubeRay submits through the running cluster's dashboard: no submitter pod to wait for.
    assert spec["submissionMode"] == "HTTPMode" and "submitterPodTemplate" not in spec
    assert spec["entrypoint"].startswith("python -m mlkube.flows.train")
    assert "MLFLOW_TRACKING_URI" in spec["runtimeEnvYAML"]
    own = build_rayjob(run(), "http://mlflow:5000")["spec"]
    assert "clusterSelector" not in own and own["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({}, "spec.ray.cluster: give exactly one of name, selector, warm"),
        ({"name": "a", "warm": True}, "spec.ray.cluster: give exactly one of name, selector"),
        ({"warm": False}, "spec.ray.cluster.warm: Input should be True"),
        ({"name": "Not_A_Name"}, "spec.ray.cluster.name: String should match pattern"),
        ({"selector": {}}, "spec.ray.cluster.selector: Dictionary should have at least 1 item"),
    ],
)
def test_bad_cluster_choices_name_the_field(cluster: dict[str, Any], message: str) -> None:
    document = {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "x"},
        "spec": {"task": "insurance", "model": {"name": "m"}, "ray": {"cluster": cluster}},
    }
    with pytest.raises(ManifestError) as raised:  # fmt: skip
        parse_resource(document)
    assert message in str(raised.value)


def test_one_warm_cluster_per_namespace_and_shape() -> None:
    first = build_warm_raycluster(run(workers=0, cluster={"warm": True}), "", NOW)
    same = build_warm_raycluster(run(workers=0, cluster={"warm": True}), "", NOW)
    bigger = build_warm_raycluster(run(workers=1, cluster={"warm": True}), "", NOW)
    elsewhere = build_warm_raycluster(run("other", workers=0, cluster={"warm": True}), "", NOW)
    assert first["metadata"]["name"] == same["metadata"]["name"] != bigger["metadata"]["name"]
    assert elsewhere["metadata"]["namespace"] == "other"
    assert first["metadata"]["name"].startswith("mlkube-warm-")
    assert first["metadata"]["labels"][WARM_LABEL] == "true"
    assert first["metadata"]["annotations"][LAST_USED] == "2026-12-01T12:00:00Z"
    # Built like a run's own cluster (restricted pods, no token), owned by nothing (it
    # outlives runs), with Prefect's API beside the head on the pod's loopback, which the
    # head's processes (the train flow) use instead of starting one each run.
    own = ray_cluster_spec(run(workers=0, cluster={"warm": True}))
    assert "ownerReferences" not in first["metadata"]
    head = first["spec"]["headGroupSpec"]["template"]["spec"]
    own_head = own["headGroupSpec"]["template"]["spec"]
    assert {k: v for k, v in head.items() if k != "containers"} == {
        k: v for k, v in own_head.items() if k != "containers"
    }
    assert head["automountServiceAccountToken"] is False
    ray_head, prefect = head["containers"]
    assert ray_head == {**own_head["containers"][0], "env": [
        *own_head["containers"][0]["env"],
        {"name": "PREFECT_API_URL", "value": "http://127.0.0.1:4200/api"},
    ], "args": [zygote_start()]}  # fmt: skip
    assert prefect["command"][:5] == ["prefect", "server", "start", "--host", "127.0.0.1"]
    assert prefect["securityContext"] == ray_head["securityContext"]
    assert prefect["image"] == ray_head["image"]


def zygote_command(command: str) -> argparse.Namespace:
    """A shell command `python -m mlkube.flows.zygote ...`, as the zygote reads it."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "mlkube.flows.zygote"]
    parsed = zygote_parser().parse_args(words[3:])
    assert (parsed.socket, parsed.module) == (ZYGOTE_SOCKET, "mlkube.flows.train")
    return parsed


def test_runs_on_a_warm_cluster_start_through_its_zygote_and_others_plainly() -> None:
    warm = build_rayjob(run(cluster={"warm": True}), "http://mlflow:5000",
                        cluster_name="mlkube-warm-0", allow_shared_models=True)  # fmt: skip
    client = zygote_command(warm["spec"]["entrypoint"])
    assert client.command == "run"
    assert client.args[0] == "--spec-json"
    # Trial workers are started ahead on warm clusters only (measured: operator/rayjob.py).
    assert client.args[2:] == ["--allow-shared-models", "--trial-workers-ahead"]
    assert json.loads(client.args[1])["metadata"]["name"] == "ins"
    # A cluster the user brings has no zygote; a run's own cluster neither.
    named = build_rayjob(run(cluster={"name": "shared"}), "u", cluster_name="shared")
    for job in (named, build_rayjob(run(), "u")):
        assert shlex.split(job["spec"]["entrypoint"])[:3] == ["python", "-m", "mlkube.flows.train"]
        assert "--trial-workers-ahead" not in job["spec"]["entrypoint"]


def test_the_warm_heads_zygote_starts_in_bash_before_ray_as_kuberay_joins_them() -> None:
    """KubeRay 1.5 (controllers/ray/common/pod.go) runs `/bin/bash -lc --` with the args,
    each padded with spaces, then `&& ulimit -n 65536; ray start ...`."""
    head = build_warm_raycluster(run(cluster={"warm": True}), "", NOW)["spec"]["headGroupSpec"]
    args = head["template"]["spec"]["containers"][0]["args"]
    assert "ray start" not in " ".join(args)  # else KubeRay would not add its own
    script = "".join(f" {a} " for a in args) + " && ulimit -n 65536; ray start --head --block"
    checked = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    serve = zygote_command(args[0].split("{")[1].rstrip("&} "))
    assert serve.command == "serve"
    assert serve.preload == ["mlkube.cli", "ray.tune", "mlkube.training.preload"]


def cluster(name: str, state: str | None = "ready", image: str = "mlkube/runtime:0.1.0",
            **meta: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-12-01T11:00:00Z", **meta},
        "spec": {"headGroupSpec": {"template": {"spec": {"containers": [{"image": image}]}}},
                 "workerGroupSpecs": [{"template": {"spec": {"containers": [
                     {"image": image + "-w"}]}}}]},
        "status": {"state": state} if state else {},
    }  # fmt: skip


def test_a_selector_picks_the_first_ready_cluster_by_name() -> None:
    assert pick_cluster([cluster("b"), cluster("a", state=None), cluster("c")]) == "b"
    assert pick_cluster([cluster("a", state="suspended")]) is None
    deleting = cluster("a", deletionTimestamp="2026-12-01T11:59:00Z")
    assert pick_cluster([deleting]) is None


def test_a_named_cluster_must_run_allowed_images_only() -> None:
    settings = OperatorSettings(allowed_images=["registry.local/team"])
    assert cluster_images(cluster("x")) == ["mlkube/runtime:0.1.0", "mlkube/runtime:0.1.0-w"]
    refusal = raycluster_refusal("spec.ray.cluster.name", "x", cluster_images(cluster("x")),
                                 settings)  # fmt: skip
    assert refusal is not None and refusal.reason == IMAGE_NOT_ALLOWED
    assert refusal.message.startswith("spec.ray.cluster.name: RayCluster 'x' runs image")
    ok = cluster("y", image="registry.local/team/ray:1")
    assert raycluster_refusal("f", "y", cluster_images(ok), settings) is None


def job_on(name: str, state: str, end: str | None = None) -> dict[str, Any]:
    return {
        "spec": {"clusterSelector": {"ray.io/cluster": name}},
        "status": {"jobDeploymentStatus": state, **({"endTime": end} if end else {})},
    }


def test_a_warm_cluster_goes_after_the_idle_time_since_its_last_use() -> None:
    warm = cluster("w", annotations={LAST_USED: "2026-12-01T11:50:00Z"})
    # Used 10 minutes ago: kept with 15 minutes' idle time, deleted with 5.
    assert warm_cluster_action(warm, [], NOW, idle_seconds=900) == "keep"
    assert warm_cluster_action(warm, [], NOW, idle_seconds=300) == "idle"
    # A job running on it: busy, whatever the time; one on another cluster does not count.
    assert warm_cluster_action(warm, [job_on("w", "Running")], NOW, 300) == "busy"
    assert warm_cluster_action(warm, [job_on("x", "Running")], NOW, 300) == "idle"
    # A job that ended 2 minutes ago is its last use.
    ended = job_on("w", "Complete", end="2026-12-01T11:58:00Z")
    assert warm_cluster_action(warm, [ended], NOW, idle_seconds=300) == "keep"
    assert warm_cluster_action(warm, [ended], NOW, idle_seconds=60) == "idle"


def test_the_zygote_refuses_runs_it_was_not_imported_for() -> None:
    """A run the zygote's imports did not see the same way runs as a plain process."""
    seen = {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "HOME": "/home/ray"}

    def request(module: str = "mlkube.flows.train", **env: str) -> Request:
        return Request(module, [], {**seen, **env}, "/", sys.executable)

    assert refusal("mlkube.flows.train", seen, request(HOME="/x", RAY_JOB_ID="02")) is None
    assert refusal("mlkube.flows.train", seen, request(PYTHONUNBUFFERED="1")) is None
    ray_job = request(PYTHONBREAKPOINT="ray.util.rpdb._driver_set_trace")
    assert refusal("mlkube.flows.train", seen, ray_job) is None
    assert refusal("mlkube.flows.train", seen, request("other")) == (
        "it serves mlkube.flows.train, not other"
    )
    changed = request(PREFECT_API_URL="http://elsewhere/api")
    assert (
        refusal("mlkube.flows.train", seen, changed) == "PREFECT_API_URL differs from the zygote's"
    )
    added = request(PYTHONPATH="/work")
    assert refusal("mlkube.flows.train", seen, added) == "PYTHONPATH differs from the zygote's"
    other_python = Request("mlkube.flows.train", [], seen, "/", "/usr/bin/python2")
    assert "not /usr/bin/python2" in str(refusal("mlkube.flows.train", seen, other_python))
