"""TrainingRun -> RayJob and ModelDeployment -> InferenceService, as plain data."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from pydantic import ValidationError

from mlkube.api import ModelDeployment, TrainingRun
from mlkube.operator.inferenceservice import PREDICTOR_CONTAINER, build_inferenceservice
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
    assert env == {
        "MLFLOW_TRACKING_URI": "http://own:5000",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
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
    assert isvc["metadata"]["annotations"]["mlkube.io/model-version"] == "7"


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
