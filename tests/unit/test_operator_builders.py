"""TrainingRun -> RayJob and ModelDeployment -> InferenceService, as plain data."""

from __future__ import annotations

import json
import shlex

import yaml

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
