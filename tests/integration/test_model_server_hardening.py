"""Issue 13: the predictor under attack and faults, against a real `mlflow server`.

Oversized and hostile requests, damaged disk caches, versions that cannot load, an MLflow
that hangs, and SIGTERM while requests wait: real ModelServer subprocesses on loopback, real
MLflow, and a loopback "black hole" that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mlkube.api.modeldeployment import UNLOADABLE_EXIT_CODE
from tests.fixtures.mlflow_server import MlflowServer, stop_process_group, wait_http_ok
from tests.integration.test_model_server import (
    ROWS,
    ModelServerProcess,
    _grpc_infer,
    _log_sklearn,
    _poll,
    _start,
    _v2_columns,
    serving,
)

pytestmark = pytest.mark.integration

GOOD, UNLOADABLE, MISSING = "hard-sk", "hard-unloadable", "hard-missing"
ONE = {"instances": ROWS[:1]}


def _version_dir(server: MlflowServer, name: str) -> Path:
    """The artifact folder of `name` version 1 on the MLflow server's own disk."""
    import mlflow

    version = mlflow.MlflowClient().get_model_version(name, "1")
    model_id = version.model_id or version.source.rsplit("/", 1)[-1]
    found = [p.parent for p in server.artifacts.rglob("MLmodel") if model_id in str(p)]
    assert found, f"no artifacts of {name} under {server.artifacts}"
    return found[0]


def _weights(directory: Path) -> Path:
    """The serialized model (model.pkl or model.skops, whichever MLflow wrote)."""
    (path,) = [p for p in directory.rglob("model.*") if p.is_file()]
    return path


def _scramble(path: Path) -> None:
    """Same size, other bytes: a damage no size check sees."""
    path.write_bytes(b"\0" * path.stat().st_size)


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer) -> MlflowServer:
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    for name in (GOOD, UNLOADABLE, MISSING):
        _log_sklearn(name)
    _scramble(_weights(_version_dir(mlflow_server, UNLOADABLE)))
    for path in (_version_dir(mlflow_server, MISSING),):
        for file in path.rglob("*"):
            if file.is_file():
                file.unlink()
    return mlflow_server


class BlackHole:
    """A loopback server that accepts connections and never answers (an MLflow that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture(scope="module")
def hole() -> Iterator[BlackHole]:
    black_hole = BlackHole()
    yield black_hole
    black_hole.close()


@pytest.fixture(scope="module")
def servers(
    registered: MlflowServer, hole: BlackHole, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ModelServerProcess]]:
    root = tmp_path_factory.mktemp("hardened")
    uri = registered.tracking_uri
    hung = f"http://127.0.0.1:{hole.port}"
    started = {
        "D": _start(root / "D", uri, "--model-uri", f"models:/{GOOD}/1", "--ttl-seconds", "600",
                    "--max-request-bytes", "1Mi", "--max-request-rows", "1000"),
        "E": _start(root / "E", uri, "--model-uri", f"models:/{UNLOADABLE}/1"),
        "F": _start(root / "F", uri, "--model-uri", f"models:/{MISSING}/1"),
        "G": _start(root / "G", hung, "--model-uri", f"models:/{GOOD}/1",
                    "--mlflow-timeout", "2", "--mlflow-retries", "0"),
    }  # fmt: skip
    with serving(started):
        yield started


def _ready(server: ModelServerProcess, name: str) -> tuple[int, int, int]:
    """What the three readiness endpoints answer: server (the pod probe), v2 model, v1 model."""
    return (
        server.get("/v2/health/ready").status_code,
        server.get(f"/v2/models/{name}/ready").status_code,
        server.get(f"/v1/models/{name}").status_code,
    )


def _cached_copy(server: ModelServerProcess, name: str) -> Path:
    (path,) = (server.root / "home" / "model-cache" / "artifacts").glob(f"models-{name}-v1-*")
    return path


# -- readiness means "can serve" -------------------------------------------------------------
def test_ready_once_artifacts_are_verified_on_disk_and_not_loaded(
    servers: dict[str, ModelServerProcess],
) -> None:
    d = servers["D"]
    _poll(lambda: _ready(d, GOOD) == (200, 200, 200))
    assert d.metric("mlkube_artifact_downloads_total", model=GOOD) == 1
    assert d.metric("mlkube_model_loads_total", model=GOOD, outcome="success") == 0  # lazy
    cache = d.root / "home" / "model-cache"
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)
    assert oct((cache / "artifacts").stat().st_mode & 0o777) == oct(0o700)


def test_a_cached_copy_damaged_in_place_is_downloaded_again(
    servers: dict[str, ModelServerProcess],
) -> None:
    d = servers["D"]
    _poll(lambda: _ready(d, GOOD)[0] == 200)
    _scramble(_weights(_cached_copy(d, GOOD)))  # sizes still match: the load fails

    answer = d.post(f"/v1/models/{GOOD}:predict", ONE)
    assert answer.status_code == 200, answer.text
    assert d.metric("mlkube_artifact_downloads_total", model=GOOD) == 2


def test_a_truncated_copy_is_not_ready_until_downloaded_again(
    servers: dict[str, ModelServerProcess],
) -> None:
    d = servers["D"]
    downloads = d.metric("mlkube_artifact_downloads_total", model=GOOD)
    weights = _weights(_cached_copy(d, GOOD))
    weights.write_bytes(weights.read_bytes()[:10])

    assert _ready(d, GOOD)[0] == 503  # the probe checks the disk, not a marker
    _poll(lambda: _ready(d, GOOD) == (200, 200, 200))  # and starts the download itself
    assert d.metric("mlkube_artifact_downloads_total", model=GOOD) == downloads + 1
    assert d.post(f"/v1/models/{GOOD}:predict", ONE).status_code == 200


def test_a_version_whose_artifacts_are_gone_is_never_ready(
    servers: dict[str, ModelServerProcess], registered: MlflowServer
) -> None:
    f = servers["F"]
    _poll(
        lambda: (
            "preparing models:/hard-missing/1 failed" in f.root.joinpath("server.log").read_text()
        )
    )
    assert _ready(f, MISSING) == (503, 503, 503)
    answer = f.post(f"/v1/models/{MISSING}:predict", ONE)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert f"Failed to load models:/{MISSING}/1" in error
    for internal in (
        registered.tracking_uri,
        "127.0.0.1",
        "mlflow-artifacts",
        str(registered.root),
    ):
        assert internal not in error, error
    assert _ready(f, MISSING)[0] == 503


def test_a_version_that_downloads_but_does_not_load_is_never_ready(
    servers: dict[str, ModelServerProcess], registered: MlflowServer
) -> None:
    """Its files are complete (sizes match), so only a trial load tells: readiness waits
    for one, and a damaged upload never takes traffic."""
    e = servers["E"]
    _poll(lambda: "will never be ready" in e.root.joinpath("server.log").read_text())
    assert e.metric("mlkube_artifact_downloads_total", model=UNLOADABLE) == 2  # one retry
    assert _ready(e, UNLOADABLE) == (503, 503, 503)
    answer = e.post(f"/v1/models/{UNLOADABLE}:predict", ONE)
    assert answer.status_code == 503
    assert str(e.root) not in answer.json()["error"]
    assert _ready(e, UNLOADABLE) == (503, 503, 503)


def test_with_exit_if_unloadable_a_version_that_does_not_load_exits_saying_why(
    registered: MlflowServer, tmp_path: Path
) -> None:
    """How the operator's predictors run: the process exits with UNLOADABLE_EXIT_CODE and
    leaves why where Kubernetes reads a container's termination message, with nothing of
    the server's internals in it."""
    termination_log = tmp_path / "termination-log"
    server = _start(
        tmp_path / "X", registered.tracking_uri, "--model-uri", f"models:/{UNLOADABLE}/1",
        "--exit-if-unloadable", "--termination-log", str(termination_log),
    )  # fmt: skip
    try:
        status = server.process.wait(timeout=120)
    finally:
        stop_process_group(server.process)
    assert status == UNLOADABLE_EXIT_CODE, (server.root / "server.log").read_text()
    message = termination_log.read_text()
    assert message.startswith(f"models:/{UNLOADABLE}/1 does not load: "), message
    for internal in (registered.tracking_uri, "127.0.0.1", str(registered.root), str(tmp_path)):
        assert internal not in message, message


# -- requests that are too big or hostile ----------------------------------------------------
def test_a_body_over_the_cap_is_a_413(servers: dict[str, ModelServerProcess]) -> None:
    d = servers["D"]
    big = b'{"instances": [' + b"1," * 600_000 + b"1]}"  # 1.2 MB, over 1Mi
    declared = httpx.post(
        f"{d.url}/v1/models/{GOOD}:predict",
        content=big,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert declared.status_code == 413
    assert "max_request_bytes" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = httpx.post(f"{d.url}/v2/models/{GOOD}/infer", content=chunks(), timeout=60)
    assert streamed.status_code == 413
    assert d.alive()


def test_a_grpc_message_over_the_cap_is_refused(servers: dict[str, ModelServerProcess]) -> None:
    import grpc

    d = servers["D"]
    columns = [
        (c, "BYTES" if isinstance(ROWS[0][c], str) else "FP64",
         np.array([("x" * 2**20 if c == "region" else ROWS[0][c])],
                  dtype=object if isinstance(ROWS[0][c], str) else float))
        for c in ROWS[0]
    ]  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        _grpc_infer(d.grpc_port, GOOD, columns)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d.alive()


def test_rows_over_the_cap_are_refused_naming_it(servers: dict[str, ModelServerProcess]) -> None:
    d = servers["D"]
    v1 = d.post(f"/v1/models/{GOOD}:predict", {"instances": ROWS[:1] * 1001})
    assert v1.status_code == 400 and "max_request_rows" in v1.json()["error"]
    v2 = d.post(f"/v2/models/{GOOD}/infer", _v2_columns(ROWS[:1] * 1001))
    assert v2.status_code == 400 and "1001 rows" in v2.json()["error"]
    assert d.post(f"/v1/models/{GOOD}:predict", {"instances": ROWS[:1] * 1000}).is_success


def test_an_error_about_many_keys_stays_small(servers: dict[str, ModelServerProcess]) -> None:
    d = servers["D"]
    record = {**ROWS[0], **{f"k{i}": 0 for i in range(60_000)}}
    answer = d.post(f"/v1/models/{GOOD}:predict", {"instances": [record]})
    assert answer.status_code == 400
    assert "and 59995 more" in answer.json()["error"]
    assert len(answer.content) < 1000


def test_v2_shapes_must_match_the_data(servers: dict[str, ModelServerProcess]) -> None:
    d = servers["D"]
    body = _v2_columns(ROWS[:2])
    body["inputs"][0]["shape"] = [1000]
    answer = d.post(f"/v2/models/{GOOD}/infer", body)
    assert answer.status_code == 400
    assert "shape [1000] needs 1000 values, got 2" in answer.json()["error"]
    good = d.post(f"/v2/models/{GOOD}/infer", _v2_columns(ROWS[:2]))
    assert good.status_code == 200, good.text


# -- MLflow hangs ----------------------------------------------------------------------------
def test_with_mlflow_hanging_requests_get_a_503_and_ready_stays_false(
    servers: dict[str, ModelServerProcess], hole: BlackHole
) -> None:
    g = servers["G"]
    assert g.get("/v2/health/live").status_code == 200

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=g.url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post(f"/v1/models/{GOOD}:predict", json=ONE) for _ in range(5)
            ))  # fmt: skip

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [503] * 5
    assert all(str(hole.port) not in a.json()["error"] for a in answers)
    assert _ready(g, GOOD) == (503, 503, 503)
    assert g.get("/v2/health/live").status_code == 200


def test_sigterm_ends_the_server_within_the_grace_period_while_mlflow_hangs(
    registered: MlflowServer, tmp_path: Path
) -> None:
    stuck = BlackHole()
    server = _start(tmp_path / "H", f"http://127.0.0.1:{stuck.port}",
                    "--model-uri", f"models:/{GOOD}/1",
                    "--mlflow-timeout", "300", "--shutdown-seconds", "10")  # fmt: skip
    try:
        wait_http_ok(server.url + "/", 120, server.process)
        waiting: list[Any] = []

        def call() -> None:
            try:
                waiting.append(httpx.post(f"{server.url}/v1/models/{GOOD}:predict",
                                          json=ONE, timeout=120).status_code)  # fmt: skip
            except httpx.HTTPError as error:
                waiting.append(type(error).__name__)

        callers = [threading.Thread(target=call, daemon=True) for _ in range(3)]
        for caller in callers:
            caller.start()
        _poll(lambda: len(stuck.accepted) >= 2)  # the prefetch and the requests' load both wait
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=25)  # the pod's 30 s less its 5 s preStop
        for caller in callers:
            caller.join(timeout=30)
        assert len(waiting) == 3  # every caller got an answer or a closed connection
    finally:
        stop_process_group(server.process)
        stuck.close()
