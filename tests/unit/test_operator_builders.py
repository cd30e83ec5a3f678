"""TrainingRun -> RayJob and ModelDeployment -> InferenceService, as plain data."""

from __future__ import annotations

import copy
import json
import shlex
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mlkube.api import ModelDeployment, TrainingRun
from mlkube.local import TELEMETRY_OFF_ENV
from mlkube.operator.inferenceservice import (
    PREDICTOR_CONTAINER,
    build_inferenceservice,
    deployment_mode,
    inferenceservice_patch,
    predictor_pod_selector,
)
from mlkube.operator.names import ISVC_NAME_MAX, RAYJOB_NAME_MAX, inferenceservice_name, rayjob_name
from mlkube.operator.rayjob import build_rayjob


def trainingrun(**spec: object) -> TrainingRun:
    return TrainingRun.model_validate({
        "metadata": {"name": "ins", "namespace": "ml", "uid": "u-1"},
        "spec": {"task": "insurance", "model": {"name": "insurance"}, **spec},
    })  # fmt: skip


def deployment(**spec: object) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "metadata": {"name": "ins", "namespace": "ml", "uid": "u-2"},
        "spec": {"model": {"name": "insurance"}, **spec},
    })  # fmt: skip


def test_rayjob_hands_the_trainingrun_to_the_train_flow() -> None:
    run = trainingrun(tuning={"numTrials": 2}, dataset={"uri": "data/it's.csv"})
    job = build_rayjob(run, "http://mlflow:5000")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "mlkube.flows.train", "--spec-json"]
    handed = json.loads(argv[4])
    assert handed["metadata"] == {"name": "ins", "namespace": "ml", "uid": "u-1"}
    assert TrainingRun.model_validate(handed).spec == run.spec
    assert "status" not in handed


def test_rayjob_runtime_env_carries_mlflow_and_no_telemetry() -> None:
    job = build_rayjob(trainingrun(mlflow={"trackingUri": "http://own:5000"}), "http://x:1")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    # The same switches as on this machine (tests/integration/test_offline.py checks them).
    assert env == {"MLFLOW_TRACKING_URI": "http://own:5000", **TELEMETRY_OFF_ENV}
    default = build_rayjob(trainingrun(), "http://default:5000")
    assert "http://default:5000" in default["spec"]["runtimeEnvYAML"]


def test_rayjob_cluster_lifecycle_and_resources() -> None:
    run = trainingrun(
        ray={"image": "img:1", "workers": 3, "head": {"cpu": "2", "memory": "4Gi"}},
        activeDeadlineSeconds=600,
        ttlSecondsAfterFinished=60,
    )
    spec = build_rayjob(run, "u")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] == 600
    assert spec["ttlSecondsAfterFinished"] == 60
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "img:1"
    assert head["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3


def containers(spec: dict) -> tuple[dict, dict | None]:
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = cluster.get("workerGroupSpecs")
    return head, workers[0]["template"]["spec"] if workers else None


def test_gpus_per_trial_become_gpu_limits_on_the_pods_that_run_trials() -> None:
    spec = build_rayjob(trainingrun(resources={"gpu": 0.5}, ray={"workers": 2}), "u")["spec"]
    head, workers = containers(spec)
    assert workers is not None
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in workers["containers"][0]["resources"]["requests"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    # The head alone runs the trials: it gets them.
    spec = build_rayjob(trainingrun(resources={"gpu": 2}, ray={"workers": 0}), "u")["spec"]
    head, _ = containers(spec)
    assert head["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # spec.ray says how many a pod has (four trials of one GPU on each worker).
    run = trainingrun(resources={"gpu": 1}, ray={"workers": 1, "worker": {"gpu": 4}})
    _, workers = containers(build_rayjob(run, "u")["spec"])
    assert workers is not None
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # No GPUs asked for, none on any pod.
    head, workers = containers(build_rayjob(trainingrun(), "u")["spec"])
    assert workers is not None
    for pod in (head, workers):
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]


def test_a_pod_with_fewer_gpus_than_a_trial_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"ray.worker.gpu \(1\) cannot hold a trial"):
        trainingrun(resources={"gpu": 2}, ray={"worker": {"gpu": 1}})


def test_tuning_storage_mounts_the_claim_on_every_ray_pod_and_tells_the_flow() -> None:
    run = trainingrun(tuning={"storage": {"claimName": "searches"}}, ray={"retries": 2})
    spec = build_rayjob(run, "u")["spec"]
    assert spec["backoffLimit"] == 2
    for pod in containers(spec):
        assert pod is not None
        assert pod["volumes"] == [
            {"name": "tune-state", "persistentVolumeClaim": {"claimName": "searches"}}
        ]
        (container,) = pod["containers"]
        assert container["volumeMounts"] == [
            {"name": "tune-state", "mountPath": "/mlkube/tune-state"}
        ]
        assert {"name": "MLKUBE_TUNE_STORAGE", "value": "/mlkube/tune-state"} in container["env"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLKUBE_TUNE_STORAGE"] == "/mlkube/tune-state"
    # Without storage: nothing mounted, no retries unless asked.
    plain = build_rayjob(trainingrun(), "u")["spec"]
    assert "backoffLimit" not in plain
    assert all("volumes" not in pod for pod in containers(plain) if pod is not None)
    with pytest.raises(ValidationError, match="claimName"):
        trainingrun(tuning={"storage": {"claimName": "Not_A_Name"}})


def test_rayjob_without_workers_has_no_worker_group() -> None:
    spec = build_rayjob(trainingrun(ray={"workers": 0}), "u")["spec"]
    assert "workerGroupSpecs" not in spec["rayClusterSpec"]
    assert "activeDeadlineSeconds" not in spec


def test_child_names_are_deterministic_and_fit() -> None:
    long = "a" * 63
    assert rayjob_name("ins") == "ins"
    assert rayjob_name(long) == rayjob_name(long)
    assert len(rayjob_name(long)) <= RAYJOB_NAME_MAX
    assert rayjob_name(long) != rayjob_name("a" * 62 + "b")
    assert inferenceservice_name("1st") == "md-1st"
    assert len(inferenceservice_name(long)) <= ISVC_NAME_MAX


def test_inferenceservice_pins_the_version() -> None:
    md = deployment(protocol="v2", ttlSeconds=60, replicas={"min": 0, "max": 3})
    isvc = build_inferenceservice(md, 7, tracking_uri="http://m:5000", image="pred:1")
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] == 3
    assert "canaryTrafficPercent" not in predictor
    (container,) = predictor["containers"]
    assert container["name"] == PREDICTOR_CONTAINER
    assert container["command"] == ["python", "-m", "mlkube.model_servers"]
    args = container["args"]
    assert args[args.index("--model-uri") + 1] == "models:/insurance/7"
    assert args[args.index("--ttl-seconds") + 1] == "60"
    assert args[args.index("--protocol") + 1] == "v2"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://m:5000"} in container["env"]
    for name, value in TELEMETRY_OFF_ENV.items():
        assert {"name": name, "value": value} in container["env"]
    assert isvc["metadata"]["annotations"]["mlkube.io/model-version"] == "7"
    # Its pods say which version they serve, and exit if it does not load (the operator
    # finds them by that label, and reads the exit off them).
    assert predictor["labels"]["mlkube.io/model-version"] == "7"
    assert "--exit-if-unloadable" in args
    assert predictor_pod_selector(isvc["metadata"]["name"], 7) == (
        f"serving.kserve.io/inferenceservice={isvc['metadata']['name']},mlkube.io/model-version=7"
    )


def test_inferenceservice_gpus_are_the_predictors_limit() -> None:
    md = deployment(resources={"cpu": "2", "memory": "4Gi", "gpu": 1})
    isvc = build_inferenceservice(md, 7, tracking_uri="http://m:5000", image="pred:1")
    resources = isvc["spec"]["predictor"]["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert resources["requests"] == {"cpu": "2", "memory": "4Gi"}
    plain = build_inferenceservice(deployment(), 7, tracking_uri="http://m:5000", image="p:1")
    (container,) = plain["spec"]["predictor"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_inferenceservice_canary_and_raw_mode() -> None:
    md = deployment(canary={"trafficPercent": 20}, image="own:2")
    knative = build_inferenceservice(md, 2, tracking_uri="u", image="i", canary_traffic_percent=20)
    assert knative["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert knative["spec"]["predictor"]["containers"][0]["image"] == "own:2"
    raw = build_inferenceservice(
        md, 2, tracking_uri="u", image="i", canary_traffic_percent=20, deployment_mode="Standard"
    )
    assert "canaryTrafficPercent" not in raw["spec"]["predictor"]
    assert raw["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # Raw mode puts every container port on the Service: gRPC is declared there (the
    # predictor listens on it); Knative takes one port.
    raw_container = raw["spec"]["predictor"]["containers"][0]
    assert [(p["name"], p["containerPort"]) for p in raw_container["ports"]] == [
        ("http1", 8080), ("h2c", 8081),
    ]  # fmt: skip
    args = raw_container["args"]
    assert args[args.index("--grpc_port") + 1] == "8081"
    knative_ports = knative["spec"]["predictor"]["containers"][0]["ports"]
    assert [p["name"] for p in knative_ports] == ["http1"]


def test_inferenceservice_hands_request_limits_to_the_predictor() -> None:
    from mlkube.model_servers.entrypoint import (
        OneLineParser,
        add_server_arguments,
        settings_from_args,
    )

    md = deployment(limits={"maxRequestBytes": "32Mi", "maxRequestRows": 5000})
    isvc = build_inferenceservice(md, 7, tracking_uri="http://m:5000", image="pred:1")
    parser = OneLineParser()
    add_server_arguments(parser)
    args = isvc["spec"]["predictor"]["containers"][0]["args"]
    settings = settings_from_args(parser.parse_args(args))
    assert settings.max_request_bytes == 32 * 2**20
    assert settings.max_request_rows == 5000
    # unset: the predictor's own defaults, not a second copy of them here
    plain = build_inferenceservice(deployment(), 7, tracking_uri="http://m:5000", image="p:1")
    assert "--max-request-bytes" not in plain["spec"]["predictor"]["containers"][0]["args"]


def merge_patched(obj: Any, patch: Any) -> Any:
    """`obj` after a JSON merge patch (RFC 7386), as the API server applies one."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(obj) if isinstance(obj, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patched(merged.get(key), value)
    return merged


def live(manifest: dict[str, Any]) -> dict[str, Any]:
    """The InferenceService as the API server returns it: our manifest plus its defaults."""
    stored = copy.deepcopy(manifest)
    stored["metadata"]["annotations"]["kserve.io/added-by-webhook"] = "x"
    stored["spec"]["predictor"]["timeout"] = 60
    stored["spec"]["predictor"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    stored["status"] = {"url": "http://ins.ml"}
    return stored


def test_an_inferenceservice_that_says_what_the_manifest_says_is_not_patched() -> None:
    manifest = build_inferenceservice(deployment(), 3, tracking_uri="u", image="i")
    assert inferenceservice_patch(live(manifest), manifest) is None


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"version": 3}, {"version": 4}),  # a new version
        ({"version": 3}, {"version": 4, "canary_traffic_percent": 20}),  # a canary starts
        ({"version": 4, "canary_traffic_percent": 20}, {"version": 4}),  # the canary ends
        ({"version": 3}, {"version": 3, "deployment_mode": "Standard"}),  # an annotation
    ],
)
def test_the_inferenceservice_patch_makes_the_live_object_say_what_the_manifest_says(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    md = deployment(canary={"trafficPercent": 20})
    current = live(build_inferenceservice(md, tracking_uri="u", image="i", **before))
    manifest = build_inferenceservice(md, tracking_uri="u", image="i", **after)
    patch = inferenceservice_patch(current, manifest)
    assert patch is not None
    patched = merge_patched(current, patch)
    assert inferenceservice_patch(patched, manifest) is None
    predictor = patched["spec"]["predictor"]
    assert predictor.get("canaryTrafficPercent") == after.get("canary_traffic_percent")
    assert patched["metadata"]["annotations"]["mlkube.io/model-version"] == str(after["version"])
    # What the API server added is left alone.
    assert predictor["timeout"] == 60 and patched["status"] == {"url": "http://ins.ml"}


RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _pod_specs(job: dict[str, object]) -> dict[str, dict[str, object]]:
    spec = job["spec"]
    assert isinstance(spec, dict)
    cluster = spec["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster.get("workerGroupSpecs", []):
        specs["worker"] = group["template"]["spec"]
    specs["submitter"] = spec["submitterPodTemplate"]["spec"]
    return specs


def test_every_pod_of_the_rayjob_is_restricted_and_has_no_token() -> None:
    """Finding 6: head, workers and KubeRay's submitter run without a service account token,
    as non-root, with no capabilities, no privilege escalation and RuntimeDefault seccomp."""
    job = build_rayjob(trainingrun(ray={"workers": 2, "image": "img:1"}), "u")
    specs = _pod_specs(job)
    assert set(specs) == {"head", "worker", "submitter"}
    for name, pod in specs.items():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}
        }, name  # fmt: skip
        for container in pod["containers"]:  # type: ignore[attr-defined]
            assert container["securityContext"] == RESTRICTED, name
            assert container["image"] == "img:1"
    (submitter,) = specs["submitter"]["containers"]  # type: ignore[misc]
    # KubeRay fills in the submit command only when the container has none.
    assert submitter["name"] == "ray-job-submitter" and "command" not in submitter
    assert specs["submitter"]["restartPolicy"] == "Never"


def test_predictor_pods_are_restricted_have_no_token_and_carry_the_mlflow_client_label() -> None:
    predictor = build_inferenceservice(deployment(), 1, tracking_uri="u", image="i")["spec"][
        "predictor"
    ]
    assert predictor["automountServiceAccountToken"] is False
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["containers"][0]["securityContext"] == RESTRICTED
    labels = {"mlkube.io/mlflow-client": "true", "mlkube.io/model-version": "1"}
    assert predictor["labels"] == labels


def test_mlflow_credentials_come_from_the_namespace_secret_into_ray_and_predictor_pods() -> None:
    job = build_rayjob(trainingrun(ray={"workers": 1}), "u", credentials_secret="mlflow-creds")
    isvc = build_inferenceservice(
        deployment(), 1, tracking_uri="u", image="i", credentials_secret="mlflow-creds"
    )
    specs = _pod_specs(job)
    expected = {
        "MLFLOW_TRACKING_USERNAME": "username",
        "MLFLOW_TRACKING_PASSWORD": "password",
        "MLFLOW_TRACKING_TOKEN": "token",
    }
    containers = [
        specs["head"]["containers"][0],  # type: ignore[index]
        specs["worker"]["containers"][0],  # type: ignore[index]
        isvc["spec"]["predictor"]["containers"][0],
    ]
    for container in containers:
        from_secret = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
        }
        assert {k: v["key"] for k, v in from_secret.items()} == expected
        assert {v["name"] for v in from_secret.values()} == {"mlflow-creds"}
    # No Secret named: no credentials at all, and none as plain values either.
    plain = build_rayjob(trainingrun(), "u")
    env = _pod_specs(plain)["head"]["containers"][0]["env"]  # type: ignore[index]
    assert not [e for e in env if e["name"].startswith("MLFLOW_TRACKING_")]


def test_the_train_flow_learns_from_the_rayjob_whether_models_may_be_shared() -> None:
    from mlkube.flows.train import entrypoint_parser

    for shared in (False, True):
        job = build_rayjob(trainingrun(), "u", allow_shared_models=shared)
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "mlkube.flows.train"]
        assert entrypoint_parser().parse_args(argv[3:]).allow_shared_models is shared


def test_the_deployment_mode_is_the_deployments_then_its_services_then_the_operators() -> None:
    annotated = ModelDeployment.model_validate({
        "metadata": {"name": "ins", "namespace": "ml",
                     "annotations": {"serving.kserve.io/deploymentMode": "Knative"}},
        "spec": {"model": {"name": "insurance"}},
    })  # fmt: skip
    made_raw = build_inferenceservice(
        deployment(), 1, tracking_uri="u", image="i", deployment_mode="Standard"
    )
    assert deployment_mode(annotated, made_raw, "Standard") == "Knative"
    # An InferenceService keeps the mode it was made with when the operator's default changes.
    assert deployment_mode(deployment(), made_raw, "Knative") == "Standard"
    made_plain = build_inferenceservice(deployment(), 1, tracking_uri="u", image="i")
    assert deployment_mode(deployment(), made_plain, "Knative") == "Knative"
    assert deployment_mode(deployment(), None, None) is None
