"""The operator's MLflow reads: backoff only while MLflow is down, "does not exist" as
None, and a tracking URI's server treated as untrusted (no credentials unless it is the
operator's own, no redirects, its words in the log only, bounded pages, size and time).

The servers here are real loopback HTTP servers playing an attacker or a lying MLflow;
how the real MLflow answers is in tests/integration/test_operator_mlflow.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mlkube.operator import mlflow_reader
from mlkube.operator.mlflow_reader import (
    MAX_PAGES,
    MAX_READERS,
    Backoff,
    GuardedReader,
    MlflowBadAnswer,
    MlflowRefused,
    MlflowUnavailable,
    RestMlflowReader,
    reader_for,
)
from mlkube.operator.tracking import TrackingTarget
from mlkube.training.outcome import (
    TAG_MODEL_VERSION,
    TAG_NAMESPACE,
    TAG_ROLE,
    TAG_UID,
    Outcome,
)
from tests.fixtures.http_server import Reply, Seen, Server, answer

SECRET = "cloud-credentials-AKIA0123456789"


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

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> Outcome | None:
        self.calls += 1
        if self.down:
            raise MlflowUnavailable("MLflow did not answer (Connection refused)")
        return Outcome(run_id="r", state="RUNNING")

    def resolve_alias(self, model: str, alias: str) -> int | None:
        self.find_outcome("", "")
        return 4


def test_guarded_reader_does_not_hammer_a_down_mlflow() -> None:
    inner = FlakyReader()
    reader = GuardedReader(inner, Backoff(initial=0.2, maximum=1))
    with pytest.raises(MlflowUnavailable, match="refused"):
        reader.find_outcome("u", "ns")
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
    reader = RestMlflowReader(f"http://127.0.0.1:{closed_port()}", timeout=1, credentials=False)
    with pytest.raises(MlflowUnavailable, match="did not answer"):
        reader.resolve_alias("m", "champion")
    with pytest.raises(MlflowUnavailable):
        reader.find_outcome("uid", "ns")


# --------------------------------------------------------------------------- loopback servers


def parent_run(run_id: str, uid: str, namespace: str, version: str = "3") -> dict[str, Any]:
    tags = {TAG_UID: uid, TAG_NAMESPACE: namespace, TAG_ROLE: "parent", TAG_MODEL_VERSION: version}
    return {
        "info": {"run_id": run_id, "status": "FINISHED"},
        "data": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }


def test_rest_reader_requests(serve: Callable[..., Server]) -> None:
    def mlflow(request: Seen) -> Reply:
        if request.path.startswith("/api/2.0/mlflow/registered-models/alias"):
            if "alias=champion" in request.path:
                return answer(200, {"model_version": {"version": "5"}})
            return answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
        if request.path.endswith("experiments/search"):
            return answer(200, {"experiments": [{"experiment_id": "0"}, {"experiment_id": "7"}]})
        if request.path.startswith("/api/2.0/mlflow/runs/get"):
            return answer(500, {"error_code": "INTERNAL_ERROR"})
        return answer(200, {"runs": [parent_run("r9", "u-1", "team-a")]})

    server = serve(mlflow)
    reader = RestMlflowReader(server.uri, credentials=False)
    assert reader.resolve_alias("insurance", "champion") == 5
    assert reader.resolve_alias("insurance", "nope") is None
    outcome = reader.find_outcome("u-1", "team-a")
    assert outcome and (outcome.run_id, outcome.state, outcome.model_version) == (
        "r9",
        "FINISHED",
        3,
    )
    search = next(s.body for s in server.seen if s.path.endswith("runs/search"))
    assert search["experiment_ids"] == ["0", "7"]
    assert "u-1" in search["filter"] and "team-a" in search["filter"]
    assert "parent" in search["filter"]
    # A run that does not carry this TrainingRun's uid and namespace is not its outcome,
    # whatever the server's search returned.
    assert reader.find_outcome("u-1", "team-b") is None
    with pytest.raises(MlflowUnavailable, match="HTTP 500"):
        reader.find_outcome("u-1", "team-a", run_id="r9")


# --------------------------------------------------------------------------- finding 1


def test_a_spec_uri_gets_no_credentials_and_no_redirect_is_followed(
    serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    elsewhere = serve(lambda request: answer(200, {"model_version": {"version": "1"}}))
    attacker = serve(lambda request: answer(302, {}, Location=f"{elsewhere.uri}/loot"))

    spec_reader = reader_for(TrackingTarget(uri=attacker.uri, credentials=False))
    with pytest.raises(MlflowRefused) as refused:
        spec_reader.resolve_alias("m", "champion")
    assert refused.value.message == (
        "MLflow answered with a redirect (HTTP 302), which is not followed"
    )
    assert refused.value.reason == "Refused"
    assert [s.headers.get("Authorization") for s in attacker.seen] == [None]
    assert elsewhere.seen == []
    # The operator's own URI does carry the token (so the assertion above can fail).
    own_reader = reader_for(TrackingTarget(uri=attacker.uri, credentials=True))
    with pytest.raises(MlflowRefused):
        own_reader.resolve_alias("m", "champion")
    assert attacker.seen[-1].headers.get("Authorization") == f"Bearer {SECRET}"
    assert elsewhere.seen == []


@pytest.mark.parametrize(("code", "error"), [(500, MlflowUnavailable), (403, MlflowRefused),
                                             (418, MlflowRefused)])  # fmt: skip
def test_what_the_server_says_goes_to_the_log_only(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture, code: int, error: type
) -> None:
    server = serve(lambda request: answer(code, {"message": f"here are the {SECRET}"}))
    reader = RestMlflowReader(server.uri, credentials=False)
    with caplog.at_level(logging.WARNING, "mlkube.operator.mlflow"), pytest.raises(error) as failed:
        reader.resolve_alias("m", "champion")
    assert SECRET not in failed.value.message and SECRET not in str(failed.value)
    assert failed.value.message.endswith(f"(HTTP {code})") or f"HTTP {code}" in failed.value.message
    assert SECRET in caplog.text


# --------------------------------------------------------------------------- finding 2


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (400, {"error_code": "INVALID_PARAMETER_VALUE"}),  # MLflow 3: a missing alias
        (400, {"error_code": "RESOURCE_DOES_NOT_EXIST"}),
        (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}),
        (404, "not json at all"),
    ],
)
def test_does_not_exist_is_none_and_mlflow_stays_up(
    serve: Callable[..., Server], code: int, body: Any
) -> None:
    server = serve(lambda request: answer(code, body))
    reader = GuardedReader(RestMlflowReader(server.uri, credentials=False), Backoff(60, 60))
    assert reader.resolve_alias("m", "gone") is None
    assert reader.backoff.failures == 0
    assert reader.resolve_alias("other", "champion") is None  # asked, not refused
    assert len(server.seen) == 2


def test_only_server_errors_back_off_and_the_message_names_no_model(
    serve: Callable[..., Server],
) -> None:
    status = {"code": 400}
    server = serve(lambda request: answer(status["code"], {"error_code": "BAD_REQUEST"}))
    reader = GuardedReader(RestMlflowReader(server.uri, credentials=False), Backoff(60, 60))
    with pytest.raises(MlflowRefused):
        reader.resolve_alias("team-a-model", "champion")
    assert reader.backoff.failures == 0
    status["code"] = 503
    with pytest.raises(MlflowUnavailable) as first:
        reader.resolve_alias("team-a-model", "champion")
    assert reader.backoff.failures == 1
    # Another resource on the same URI is told MLflow is down, in words that name no model.
    with pytest.raises(MlflowUnavailable) as second:
        reader.resolve_alias("team-b-model", "champion")
    for message in (first.value.message, second.value.message):
        assert "team-a-model" not in message and "MLflow answered HTTP 503" in message
    assert len(server.seen) == 2


# --------------------------------------------------------------------------- finding 3


def test_endless_paging_is_cut_off(serve: Callable[..., Server]) -> None:
    pages = iter(range(10**9))

    def endless(request: Seen) -> Reply:
        experiments = [{"experiment_id": str(n)} for n in range(1000)]
        return answer(200, {"experiments": experiments, "next_page_token": f"t{next(pages)}"})

    server = serve(endless)
    reader = RestMlflowReader(server.uri, credentials=False)
    with pytest.raises(MlflowBadAnswer, match=f"more than {MAX_PAGES} pages"):
        reader.find_outcome("u", "ns")
    assert len(server.seen) == MAX_PAGES


def test_a_page_larger_than_asked_for_is_a_bad_answer(serve: Callable[..., Server]) -> None:
    experiments = [{"experiment_id": str(n)} for n in range(mlflow_reader.PAGE_SIZE + 1)]
    server = serve(lambda request: answer(200, {"experiments": experiments}))
    with pytest.raises(MlflowBadAnswer, match="experiments a page"):
        RestMlflowReader(server.uri, credentials=False).find_outcome("u", "ns")


def test_a_repeated_page_token_ends_the_listing(serve: Callable[..., Server]) -> None:
    def circle(request: Seen) -> Reply:
        if request.path.endswith("experiments/search"):
            return answer(200, {"experiments": [{"experiment_id": "1"}], "next_page_token": "t"})
        return answer(200, {"runs": [parent_run("r1", "u", "ns")]})

    server = serve(circle)
    outcome = RestMlflowReader(server.uri, credentials=False).find_outcome("u", "ns")
    assert outcome is not None and outcome.run_id == "r1"
    assert [s.path.rsplit("/", 1)[-1] for s in server.seen] == ["search", "search", "search"]
    assert [s.path.endswith("runs/search") for s in server.seen] == [False, False, True]


@pytest.mark.timeout(60)  # a safety net: without the call budget this would never end
def test_a_dripping_answer_is_cut_at_the_call_budget(serve: Callable[..., Server]) -> None:
    stop = threading.Event()

    def drip(request: Seen) -> None:
        handler = request.body
        handler.send_response(200)
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        while not stop.is_set():
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.02)

    server = serve(drip)
    try:
        # Cut at the call budget, or at the socket timeout when a loaded machine delays a
        # drop by more than the timeout: either way the call ends as "unavailable".
        with pytest.raises(MlflowUnavailable, match="did not answer"):
            RestMlflowReader(server.uri, timeout=0.25, credentials=False).resolve_alias("m", "a")
    finally:
        stop.set()


def test_a_huge_answer_is_refused(serve: Callable[..., Server]) -> None:
    big = b" " * (mlflow_reader.MAX_ANSWER_BYTES + 1)
    server = serve(lambda request: (200, {"Content-Type": "application/json"}, big))
    with pytest.raises(MlflowBadAnswer, match="larger than"):
        RestMlflowReader(server.uri, credentials=False).resolve_alias("m", "a")


@pytest.mark.parametrize(
    "body",
    [[1, 2], {"model_version": {"version": "abc"}}, {"model_version": "x"}, "{"],
)
def test_an_answer_of_the_wrong_shape_is_a_bad_answer(
    serve: Callable[..., Server], body: Any
) -> None:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    server = serve(lambda request: (200, {}, data))
    reader = GuardedReader(RestMlflowReader(server.uri, credentials=False), Backoff(60, 60))
    with pytest.raises(MlflowBadAnswer) as bad:
        reader.resolve_alias("m", "a")
    assert bad.value.message == "MLflow's answer is not what its API answers"
    assert reader.backoff.failures == 0


def test_the_reader_cache_is_bounded_and_keeps_the_operators_own() -> None:
    own = reader_for(TrackingTarget(uri="http://mlflow:5000", credentials=True))
    targets = [
        TrackingTarget(uri=f"http://h{n}.example:1", credentials=False)
        for n in range(MAX_READERS * 3)
    ]
    readers = [reader_for(target) for target in targets]
    assert len(mlflow_reader._readers) <= MAX_READERS
    assert reader_for(targets[-1]) is readers[-1]  # the recent ones are kept
    assert reader_for(TrackingTarget(uri="http://mlflow:5000", credentials=True)) is own
