"""`mlkube serve -f modeldeployment.yaml` and `mlkube predict` against a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.fixtures.mlflow_server import (
    QUIET_ENV,
    MlflowServer,
    free_port,
    stop_process_group,
    tail,
    wait_http_ok,
)

pytestmark = pytest.mark.integration

NAME = "cli-ins"
RECORD = {"age": 40.0, "bmi": 28.5, "smoker": "no"}
DEPLOYMENT = f"""\
apiVersion: mlkube.io/v1alpha1
kind: ModelDeployment
metadata: {{name: {NAME}}}
spec:
  model: {{name: {NAME}}}
  protocol: v1
  ttlSeconds: 60
"""


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer) -> str:
    import mlflow
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(18, 65, 60),
            "bmi": rng.uniform(18, 40, 60),
            "smoker": rng.choice(["yes", "no"], 60),
        }
    )
    target = frame["age"] * 200 + (frame["smoker"] == "yes") * 20000
    model = make_pipeline(
        make_column_transformer((OneHotEncoder(), ["smoker"]), remainder="passthrough"),
        RandomForestRegressor(n_estimators=5, random_state=0),
    ).fit(frame, target)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=frame.head(2),
            pip_requirements=["scikit-learn", "skops"],
            registered_model_name=NAME,
            skops_trusted_types=["sklearn.tree._tree.Tree"],  # our own file
        )
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    return mlflow_server.tracking_uri


def mlkube(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlkube", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def served(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("cli")
    manifest = root / "modeldeployment.yaml"
    manifest.write_text(DEPLOYMENT)
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, **QUIET_ENV, "MLKUBE_HOME": str(root / "home"), "TMPDIR": str(root)}
    command = [
        sys.executable,
        "-m",
        "mlkube",
        "serve",
        "-f",
        str(manifest),
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--tracking-uri",
        registered,
    ]
    with open(root / "serve.log", "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/", 120, process)
        except Exception as error:
            raise RuntimeError(f"{error}\n{tail(root / 'serve.log')}") from None
        yield {
            "url": f"http://127.0.0.1:{port}",
            "port": str(port),
            "grpc_port": str(grpc_port),
            "manifest": str(manifest),
            "root": str(root),
        }
    finally:
        stop_process_group(process)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening socket on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_serve_listens_on_loopback_only(served: dict[str, str]) -> None:
    # 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net/tcp{,6} write them
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    for port in (served["port"], served["grpc_port"]):
        addresses = listening_addresses(int(port))
        assert addresses and addresses <= loopback, f"port {port} listens on {addresses}"


def test_predict_prints_the_answer(served: dict[str, str], tmp_path: Path) -> None:
    v1 = mlkube(
        "predict", "-f", served["manifest"], "--url", served["url"], "-d", json.dumps([RECORD])
    )
    assert v1.returncode == 0, v1.stderr
    predictions = json.loads(v1.stdout)["predictions"]
    v2 = mlkube(
        "predict",
        "--model",
        NAME,
        "--protocol",
        "v2",
        "--url",
        served["url"],
        "-d",
        json.dumps(RECORD),
    )
    assert v2.returncode == 0, v2.stderr
    assert json.loads(v2.stdout)["outputs"][0]["data"] == predictions
    csv = tmp_path / "rows.csv"
    pd.DataFrame([RECORD]).to_csv(csv, index=False)
    from_csv = mlkube("predict", "-f", served["manifest"], "--url", served["url"], "-i", str(csv))
    assert json.loads(from_csv.stdout)["predictions"] == predictions


def test_bad_cli_input_is_one_line_and_nonzero(served: dict[str, str], tmp_path: Path) -> None:
    cases = [
        (("serve", "-f", str(tmp_path / "missing.yaml")), 2, "missing.yaml: no such file"),
        (("predict", "--model", NAME, "-d", "{"), 2, "--data: malformed JSON"),
        (("predict", "--model", NAME, "-i", str(tmp_path / "x.csv")), 2, "x.csv: no such file"),
        (
            ("predict", "--model", NAME, "--url", served["url"], "-d", '{"age": 1}'),
            1,
            "HTTP 400: missing column(s): bmi, smoker",
        ),
        (
            ("predict", "--model", "nobody", "--url", "http://127.0.0.1:9", "-d", "{}"),
            1,
            "cannot reach",
        ),
    ]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(DEPLOYMENT.replace("ttlSeconds: 60", "ttlSeconds: -1"))
    cases.append((("serve", "-f", str(bad_yaml)), 2, "spec.ttlSeconds"))
    for args, code, message in cases:
        result = mlkube(*args)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "Traceback" not in result.stderr
