"""The operator's MLflow reads: backoff while MLflow is down, errors as MlflowUnavailable."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mlkube.operator.mlflow_reader import (
    Backoff,
    GuardedReader,
    MlflowUnavailable,
    RestMlflowReader,
)
from mlkube.training.outcome import TAG_MODEL_VERSION, TAG_ROLE, TAG_UID, Outcome


def test_backoff_doubles_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(initial=2, maximum=10)
    assert backoff.ready(0)
    assert [backoff.failed(0, "x") for _ in range(4)] == [2, 4, 8, 10]
    assert not backoff.ready(9) and backoff.ready(10)
    backoff.succeeded()
    assert backoff.ready(0) and backoff.failures == 0


class FlakyReader:
    tracking_uri = "http://flaky"

    def __init__(self) -> None:
        self.calls = 0
        self.down = True

    def find_outcome(self, uid: str, run_id: str | None = None) -> Outcome | None:
        self.calls += 1
        if self.down:
            raise MlflowUnavailable("connection refused")
        return Outcome(run_id="r", state="RUNNING")

    def resolve_alias(self, model: str, alias: str) -> int | None:
        self.find_outcome("")
        return 4


def test_guarded_reader_does_not_hammer_a_down_mlflow() -> None:
    inner = FlakyReader()
    reader = GuardedReader(inner, Backoff(initial=0.2, maximum=1))
    with pytest.raises(MlflowUnavailable, match="refused"):
        reader.find_outcome("u")
    with pytest.raises(MlflowUnavailable, match="next attempt in"):
        reader.resolve_alias("m", "champion")
    assert inner.calls == 1
    inner.down = False
    reader.backoff.next_attempt = 0  # the backoff has passed
    assert reader.resolve_alias("m", "champion") == 4
    assert reader.backoff.failures == 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_mlflow_is_unavailable_not_a_crash() -> None:
    reader = RestMlflowReader(f"http://127.0.0.1:{closed_port()}", timeout=1)
    with pytest.raises(MlflowUnavailable):
        reader.resolve_alias("m", "champion")
    with pytest.raises(MlflowUnavailable):
        reader.find_outcome("uid")


@pytest.fixture
def fake_mlflow() -> Iterator[tuple[str, list[tuple[str, str, dict]]]]:
    """A loopback stand-in for MLflow's REST API that records what it is asked."""
    seen: list[tuple[str, str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            seen.append(("GET", self.path, {}))
            if self.path.startswith("/api/2.0/mlflow/registered-models/alias"):
                if "alias=champion" in self.path:
                    self._answer(200, {"model_version": {"version": "5"}})
                else:
                    self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
            else:
                self._answer(500, {"error_code": "INTERNAL_ERROR"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(("POST", self.path, body))
            if self.path.endswith("experiments/search"):
                self._answer(200, {"experiments": [{"experiment_id": "0"}, {"experiment_id": "7"}]})
            else:
                tags = [{"key": TAG_UID, "value": "u-1"}, {"key": TAG_ROLE, "value": "parent"},
                        {"key": TAG_MODEL_VERSION, "value": "3"}]  # fmt: skip
                run = {"info": {"run_id": "r9", "status": "FINISHED"}, "data": {"tags": tags}}
                self._answer(200, {"runs": [run]})

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_rest_reader_requests(fake_mlflow: tuple[str, list[tuple[str, str, dict]]]) -> None:
    uri, seen = fake_mlflow
    reader = RestMlflowReader(uri)
    assert reader.resolve_alias("insurance", "champion") == 5
    assert reader.resolve_alias("insurance", "nope") is None
    outcome = reader.find_outcome("u-1")
    assert outcome and (outcome.run_id, outcome.state, outcome.model_version) == (
        "r9",
        "FINISHED",
        3,
    )
    search = next(body for method, path, body in seen if path.endswith("runs/search"))
    assert search["experiment_ids"] == ["0", "7"]
    assert "u-1" in search["filter"] and "parent" in search["filter"]
    with pytest.raises(MlflowUnavailable, match="HTTP 500"):
        reader.find_outcome("u-1", run_id="r9")
