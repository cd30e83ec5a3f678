"""What the operator reads from MLflow: a TrainingRun's outcome and an alias's version.

Over MLflow's REST API for http(s) tracking URIs: importing the mlflow client pulls in
pandas and pyarrow when they are installed (~180 MB, seconds on a busy node) and its HTTP
retries block for minutes; the operator needs four read-only calls and its own backoff.
Other URIs (file, sqlite, databricks) go through MlflowClient, imported on first use.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from mlkube.training.outcome import Outcome, outcome_from_tags, trainingrun_filter


class MlflowUnavailable(Exception):
    """MLflow did not answer (or answered with a server error): try again later."""


class MlflowReader(Protocol):
    tracking_uri: str

    def find_outcome(self, uid: str, run_id: str | None = None) -> Outcome | None:
        """The TrainingRun's parent run as an Outcome; None while there is none."""

    def resolve_alias(self, model: str, alias: str) -> int | None:
        """The version the alias points at; None when the model or alias does not exist."""


class Backoff:
    """Exponential backoff between attempts while a service is unreachable."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.failures = 0
        self.next_attempt = 0.0
        self.last_error = ""

    def ready(self, now: float) -> bool:
        return now >= self.next_attempt

    def failed(self, now: float, error: str) -> float:
        delay = min(self.initial * 2.0**self.failures, self.maximum)
        self.failures += 1
        self.next_attempt = now + delay
        self.last_error = error
        return delay

    def succeeded(self) -> None:
        self.failures, self.next_attempt, self.last_error = 0, 0.0, ""


class RestMlflowReader:
    def __init__(self, tracking_uri: str, timeout: float = 5.0) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = (
            os.environ.get("MLFLOW_TRACKING_USERNAME"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD"),
        )
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        return headers

    def _call(
        self, path: str, *, query: dict[str, str] | None = None, body: Any = None
    ) -> dict[str, Any] | None:
        """JSON of a 2xx answer; None for 404 (no such resource); MlflowUnavailable else."""
        url = f"{self.tracking_uri}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer: dict[str, Any] = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            detail = error.read()[:300].decode(errors="replace")
            raise MlflowUnavailable(f"{url}: HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise MlflowUnavailable(f"{self.tracking_uri}: {reason}") from None

    def _experiment_ids(self) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            body: dict[str, Any] = {"max_results": 1000, "view_type": "ALL"}
            if token:
                body["page_token"] = token
            page = self._call("experiments/search", body=body) or {}
            ids += [e["experiment_id"] for e in page.get("experiments", [])]
            token = page.get("next_page_token")
            if not token:
                return ids

    @staticmethod
    def _outcome(run: dict[str, Any]) -> Outcome:
        info, data = run.get("info", {}), run.get("data", {})
        tags = {t["key"]: t.get("value", "") for t in data.get("tags", [])}
        return outcome_from_tags(info["run_id"], info.get("status", "RUNNING"), tags)

    def find_outcome(self, uid: str, run_id: str | None = None) -> Outcome | None:
        if run_id:
            found = self._call("runs/get", query={"run_id": run_id})
            if found and "run" in found:
                return self._outcome(found["run"])
        experiments = self._experiment_ids()
        if not experiments:
            return None
        body = {
            "experiment_ids": experiments,
            "filter": trainingrun_filter(uid),
            "run_view_type": "ALL",
            "max_results": 1,
            "order_by": ["attributes.start_time DESC"],
        }
        runs = (self._call("runs/search", body=body) or {}).get("runs", [])
        return self._outcome(runs[0]) if runs else None

    def resolve_alias(self, model: str, alias: str) -> int | None:
        found = self._call("registered-models/alias", query={"name": model, "alias": alias})
        if not found or "model_version" not in found:
            return None
        return int(found["model_version"]["version"])


class ClientMlflowReader:
    """Any other tracking URI, through MlflowClient (imported here, on first use)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def find_outcome(self, uid: str, run_id: str | None = None) -> Outcome | None:
        from mlflow.entities import ViewType

        try:
            client = self._client()
            experiments = [e.experiment_id for e in client.search_experiments(ViewType.ALL)]
            runs = client.search_runs(
                experiment_ids=experiments,
                filter_string=trainingrun_filter(uid),
                run_view_type=ViewType.ALL,
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
        except Exception as error:  # the client raises many kinds; all mean "not now"
            raise MlflowUnavailable(f"{self.tracking_uri}: {error}") from None
        if not runs:
            return None
        run = runs[0]
        return outcome_from_tags(run.info.run_id, run.info.status, dict(run.data.tags))

    def resolve_alias(self, model: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self._client().get_model_version_by_alias(model, alias).version)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise MlflowUnavailable(f"{self.tracking_uri}: {error}") from None
        except Exception as error:
            raise MlflowUnavailable(f"{self.tracking_uri}: {error}") from None


Answer = TypeVar("Answer")


class GuardedReader:
    """A reader that, once MLflow fails, refuses calls until the backoff has passed, so
    that a down MLflow costs one timeout per backoff step, not one per object."""

    def __init__(self, reader: MlflowReader, backoff: Backoff) -> None:
        self.reader = reader
        self.tracking_uri = reader.tracking_uri
        self.backoff = backoff
        self._lock = threading.Lock()

    def _guarded(self, call: Callable[..., Answer], *args: Any) -> Answer:
        now = time.monotonic()
        with self._lock:
            if not self.backoff.ready(now):
                wait = self.backoff.next_attempt - now
                raise MlflowUnavailable(f"{self.backoff.last_error} (next attempt in {wait:.0f}s)")
        try:
            result = call(*args)
        except MlflowUnavailable as error:
            with self._lock:
                self.backoff.failed(time.monotonic(), str(error))
            raise
        with self._lock:
            self.backoff.succeeded()
        return result

    def find_outcome(self, uid: str, run_id: str | None = None) -> Outcome | None:
        return self._guarded(self.reader.find_outcome, uid, run_id)

    def resolve_alias(self, model: str, alias: str) -> int | None:
        return self._guarded(self.reader.resolve_alias, model, alias)


_readers: dict[str, GuardedReader] = {}
_readers_lock = threading.Lock()


def reader_for(
    tracking_uri: str, *, timeout: float = 5.0, backoff_initial: float = 2.0,
    backoff_max: float = 120.0,
) -> GuardedReader:  # fmt: skip
    """One reader (and one backoff) per tracking URI, for the life of the process."""
    with _readers_lock:
        reader = _readers.get(tracking_uri)
        if reader is None:
            scheme = urllib.parse.urlparse(tracking_uri).scheme
            inner: MlflowReader = (
                RestMlflowReader(tracking_uri, timeout)
                if scheme in ("http", "https")
                else ClientMlflowReader(tracking_uri)
            )
            reader = GuardedReader(inner, Backoff(backoff_initial, backoff_max))
            _readers[tracking_uri] = reader
        return reader
