"""Datasets and MLflow artifacts on a real S3-compatible server (versitygw on loopback), and
MLflow on a real PostgreSQL: what a team's setup looks like, on this machine.

- A TrainingRun reads its dataset from s3:// (pandas through s3fs) and its MLflow server
  keeps artifacts on S3 that clients write and read themselves (boto3, their own keys from
  the standard AWS_* variables); the predictor loads the registered version from there.
- Two MLflow servers on one PostgreSQL and one S3 bucket (artifacts proxied: only the
  servers hold keys): a version logged through one is served through the other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from mlkube.cli import main as cli_main
from tests.cluster.objectstore import ObjectStore
from tests.cluster.postgres import Postgres
from tests.fixtures.mlflow_server import (
    MlflowServer,
    process_wide_uris,
    start_mlflow_server,
    stop_process_group,
)
from tests.integration.conftest import example
from tests.integration.test_model_server import ROWS, _log_sklearn, _start, serving

pytestmark = pytest.mark.integration

SMALL = {"numTrials": 2, "maxConcurrentTrials": 2}


@pytest.fixture
def aws_env(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The store's keys in this process's environment, as envFrom puts them in a pod's."""
    env = object_store.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def servers() -> Iterator[list[MlflowServer]]:
    started: list[MlflowServer] = []
    yield started
    for server in started:
        stop_process_group(server.process)


def train(tmp_path: Path, model: str, tracking_uri: str, dataset: str) -> int:
    document = example("insurance")
    document["spec"].update(
        model={"name": model}, tuning=SMALL, dataset={"uri": dataset, "target": "charges"},
        mlflow={"trackingUri": tracking_uri},
    )  # fmt: skip
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(document))
    with process_wide_uris():
        return cli_main(["train", "-f", str(path)])


def predictions(tmp_path: Path, tracking_uri: str, model: str, env: dict[str, str]) -> Any:
    """The predictor (a real KServe ModelServer) serving the champion, given `env` (keys or
    none), asked for ROWS over v1."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        server = _start(tmp_path / "predictor", tracking_uri,
                        "--model-uri", f"models:/{model}@champion")  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with serving({"p": server}):
        answer = server.post(f"/v1/models/{model}:predict", {"instances": ROWS})
        assert answer.status_code == 200, answer.text
        downloads = server.metric("mlkube_artifact_downloads_total", model=model)
        return np.asarray(answer.json()["predictions"]), downloads


def direct(tracking_uri: str, model: str, tmp: Path) -> Any:
    import mlflow

    with process_wide_uris(tracking_uri):
        path = mlflow.artifacts.download_artifacts(f"models:/{model}@champion", dst_path=str(tmp))
        return np.asarray(mlflow.pyfunc.load_model(path).predict(pd.DataFrame(ROWS)))


@pytest.mark.usefixtures("ray_local", "prefect_api")
def test_dataset_and_artifacts_on_s3_read_and_written_with_the_clients_own_keys(
    tmp_path: Path,
    object_store: ObjectStore,
    aws_env: dict[str, str],
    insurance_csv: Path,
    model_name: str,
    servers: list[MlflowServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset = object_store.put("datasets", "team-a/insurance.csv", insurance_csv)
    bucket = object_store.bucket("mlflow-direct")
    # The server hands out s3:// locations; clients write and read them with their own keys.
    server = start_mlflow_server(tmp_path / "mlflow", artifacts=f"{bucket}/artifacts",
                                 proxied=False)  # fmt: skip
    servers.append(server)

    assert train(tmp_path, model_name, server.tracking_uri, dataset) == 0, capsys.readouterr()
    client = MlflowClient(server.tracking_uri)
    version = client.get_model_version_by_alias(model_name, "champion")
    assert version.version == "1"
    assert client.get_model_version_download_uri(model_name, "1").startswith(bucket + "/")
    stored = object_store.keys("mlflow-direct")
    assert any(k.endswith("/MLmodel") for k in stored), stored
    assert not server.artifacts.exists() or not any(server.artifacts.iterdir())

    served, downloads = predictions(tmp_path, server.tracking_uri, model_name, aws_env)
    np.testing.assert_allclose(served, direct(server.tracking_uri, model_name, tmp_path / "d"))
    assert downloads == 1

    # A dataset that is not there: one line naming it, before any search.
    capsys.readouterr()
    missing = dataset.replace("insurance.csv", "nope.csv")
    assert train(tmp_path, model_name + "-x", server.tracking_uri, missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.csv" in err[0] and err[0].startswith("error: "), err


def test_two_mlflow_servers_on_one_postgresql_and_one_bucket(
    tmp_path: Path,
    object_store: ObjectStore,
    postgres: Postgres,
    model_name: str,
    servers: list[MlflowServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = object_store.bucket("mlflow-proxied")
    keys = object_store.env()
    for n in (1, 2):  # replicas: same database, same bucket; only they hold the keys
        servers.append(
            start_mlflow_server(
                tmp_path / f"mlflow-{n}",
                backend_store_uri=postgres.uri,
                artifacts=f"{bucket}/artifacts",
                server_env=keys,
            )  # fmt: skip
        )
    first, second = servers
    # The clients have no S3 keys at all: artifacts go through the servers.
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    with process_wide_uris(first.tracking_uri):
        _log_sklearn(model_name)
    MlflowClient(first.tracking_uri).set_registered_model_alias(model_name, "champion", "1")

    # What one replica wrote, the other reads: the registry from PostgreSQL, files from S3.
    seen = MlflowClient(second.tracking_uri).get_model_version_by_alias(model_name, "champion")
    assert seen.version == "1"
    assert postgres.query(
        f"select count(*) from model_versions where name = '{model_name}'"
    ) == "1"  # fmt: skip
    assert any(k.endswith("/MLmodel") for k in object_store.keys("mlflow-proxied"))
    served, _ = predictions(tmp_path, second.tracking_uri, model_name, {})
    np.testing.assert_allclose(served, direct(first.tracking_uri, model_name, tmp_path / "d"))
