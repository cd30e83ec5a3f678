"""The predictor as Open Inference Protocol clients see it: NVIDIA's tritonclient, a client no
one here wrote, over v2 REST and gRPC, against a real predictor process and a real `mlflow
server`.

Health, server and model metadata, and inference for a tabular model (named columns of
numbers and strings) and a tensor model (an mnist-like CNN on 8x8 images). Every request is
built from the metadata the server answers, as such clients do; predictions must equal the
model's own. The client runs as a program of its own (tests/fixtures/triton_client.py), as
users run it: tritonclient.grpc cannot share a process with kserve.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.fixtures.mlflow_server import MlflowServer
from tests.integration.test_model_server import (
    ROWS,
    ModelServerProcess,
    _direct_model,
    _log_sklearn,
    _log_torch,
    _poll,
    _start,
    serving,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TABULAR, TENSOR = "triton-tab", "triton-cnn"
IMAGE = [1, 8, 8]  # channels, height, width: scikit-learn's digits


def _log_cnn(name: str) -> None:
    """A small CNN on 8x8 one-channel images (untrained: the protocol is under test)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    )
    _log_torch(name, net, _digits(2))


def _digits(count: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images[:count] / 16.0
    return images.reshape(count, *IMAGE).astype(np.float32)


@pytest.fixture(scope="module")
def predictor(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServerProcess]:
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    client = mlflow.MlflowClient()
    for name, log in ((TABULAR, _log_sklearn), (TENSOR, _log_cnn)):
        log(name)
        client.set_registered_model_alias(name, "champion", "1")
    root = tmp_path_factory.mktemp("triton-client")
    server = _start(root / "server", mlflow_server.tracking_uri, "--multi-model")
    with serving({"server": server}):
        for name in (TABULAR, TENSOR):  # the first probe starts the download and trial load
            _poll(lambda name=name: server.get(f"/v2/models/{name}/ready").status_code == 200)
        yield server


def _triton(kind: str, server: ModelServerProcess, step: str, **arguments: Any) -> Any:
    """One call of NVIDIA's tritonclient, in a process of its own (see
    tests/fixtures/triton_client.py: it cannot share a process with kserve)."""
    url = server.url.removeprefix("http://") if kind == "http" else f"127.0.0.1:{server.grpc_port}"
    request = {"kind": kind, "url": url, "step": step, **arguments}
    done = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.triton_client"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


KINDS = ["http", "grpc"]
CLIENTS = [("http", False), ("http", True), ("grpc", False)]
CLIENT_IDS = ["rest-json", "rest-binary", "grpc"]


@pytest.mark.parametrize("kind", KINDS)
def test_health_and_server_metadata(predictor: ModelServerProcess, kind: str) -> None:
    health = _triton(kind, predictor, "health", models=[TABULAR, TENSOR], unknown="no-such-model")
    assert (health["live"], health["ready"]) == (True, True)
    assert health["models"] == {TABULAR: True, TENSOR: True}
    if kind == "http":
        assert health["unknown"] is False  # a 404
    else:  # NOT_FOUND, as KServe answers for a model it does not know
        assert "NOT_FOUND" in health["unknown"]
    assert health["server_name"]


@pytest.mark.parametrize("kind", KINDS)
def test_model_metadata_lists_the_signature(predictor: ModelServerProcess, kind: str) -> None:
    tabular = _triton(kind, predictor, "metadata", model=TABULAR)
    tensor = _triton(kind, predictor, "metadata", model=TENSOR)

    assert tabular["name"] == TABULAR
    assert {(i["name"], i["datatype"], tuple(i["shape"])) for i in tabular["inputs"]} == {
        ("age", "INT64", (-1,)),
        ("sex", "BYTES", (-1,)),
        ("bmi", "FP64", (-1,)),
        ("children", "INT64", (-1,)),
        ("smoker", "BYTES", (-1,)),
        ("region", "BYTES", (-1,)),
    }
    assert [(o["datatype"], o["shape"]) for o in tabular["outputs"]] == [("FP64", [-1])]
    ((image,),) = (tensor["inputs"],)
    assert (image["datatype"], image["shape"]) == ("FP32", [-1, *IMAGE])
    ((scores,),) = (tensor["outputs"],)
    assert (scores["datatype"], scores["shape"]) == ("FP32", [-1, 10])


@pytest.mark.parametrize(("kind", "binary"), CLIENTS, ids=CLIENT_IDS)
def test_tabular_infer_equals_the_model(
    predictor: ModelServerProcess, kind: str, binary: bool, tmp_path: Path
) -> None:
    frame = pd.DataFrame(ROWS)
    expected = np.asarray(_direct_model(TABULAR, tmp_path).predict(frame))
    values = {c: frame[c].tolist() for c in frame.columns}

    answer = _triton(kind, predictor, "infer", model=TABULAR, values=values, binary=binary)

    ((output, found),) = answer.items()
    assert found is not None, f"no output named {output!r} in the answer"
    assert (found["dtype"], found["shape"]) == ("float64", [len(ROWS)])
    assert found["data"] == expected.tolist()


@pytest.mark.parametrize(("kind", "binary"), CLIENTS, ids=CLIENT_IDS)
def test_tensor_infer_equals_the_model(
    predictor: ModelServerProcess, kind: str, binary: bool, tmp_path: Path
) -> None:
    images = _digits(5)
    expected = np.asarray(_direct_model(TENSOR, tmp_path).predict(images))
    metadata = _triton(kind, predictor, "metadata", model=TENSOR)
    (image,) = metadata["inputs"]

    answer = _triton(
        kind,
        predictor,
        "infer",
        model=TENSOR,
        values={image["name"]: images.tolist()},
        binary=binary,
    )

    ((output, found),) = answer.items()
    assert found is not None, f"no output named {output!r} in the answer"
    assert (found["dtype"], found["shape"]) == ("float32", [5, 10])
    assert np.array_equal(np.asarray(found["data"], dtype=np.float32), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_an_error_the_client_reports(predictor: ModelServerProcess, kind: str) -> None:
    answer = _triton(
        kind, predictor, "infer_raw", model=TENSOR, inputs=[["pixels", [1, 3], "FP32", [0, 0, 0]]]
    )
    assert "expected shape (N, 1, 8, 8), got (1, 3)" in answer["error"]
    if kind == "grpc":  # the status code KServe gives bad input (ModelInfer maps it itself)
        assert "INVALID_ARGUMENT" in answer["error"]


def test_no_log_line_per_request(predictor: ModelServerProcess) -> None:
    """Access and timing lines are off by default (`--access-log` turns them on)."""
    log = (predictor.root / "server.log").read_text(errors="replace")
    assert "POST /v2/models/" not in log
    assert "grpc method:" not in log
    assert "kserve.io.v2" not in log  # KServe's timing lines
