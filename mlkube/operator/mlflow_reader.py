"""What the operator reads from MLflow: a TrainingRun's outcome and an alias's version.

Over MLflow's REST API for http(s) tracking URIs: importing the mlflow client pulls in
pandas and pyarrow when they are installed (~180 MB, seconds on a busy node) and its HTTP
retries block for minutes; the operator needs four read-only calls and its own backoff.
Other URIs (file, sqlite, databricks) go through MlflowClient, imported on first use; only
the operator's own tracking URI can be one (mlkube/operator/tracking.py).

A tracking URI may come from a spec, so an answer is the server's word, not ours: what it
said goes to the operator's log only; errors carry a fixed reason and a message of our own,
which is what status and events show. Redirects are not followed, answers are bounded in
size, pages and time.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from http.client import HTTPResponse
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from mlkube.operator.metrics import MLFLOW_ERRORS
from mlkube.operator.tracking import TrackingTarget
from mlkube.training.outcome import (
    MLFLOW_MISSING_CODES,
    Outcome,
    belongs_to,
    outcome_from_tags,
    trainingrun_filter,
)
from mlkube.training.ownership import TAG_OWNER

LOG = logging.getLogger("mlkube.operator.mlflow")

# MLflow's "does not exist" answers: 404, or 400 with one of these codes.
MISSING_CODES = MLFLOW_MISSING_CODES
# Statuses that mean "not now": they back off (shared by every resource on the URI).
RETRY_LATER_STATUSES = frozenset({429})
# Bounds on one call (which may page): pages, bytes per answer, and time in all.
MAX_PAGES = 50
PAGE_SIZE = 1000
MAX_ANSWER_BYTES = 8 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
CALL_BUDGET_TIMEOUTS = 4  # one call may take this many request timeouts in all
# Readers (and backoffs) kept, one per tracking URI and credentials, least recently used out.
MAX_READERS = 64


class MlflowError(Exception):
    """An MLflow read that failed. `reason` and `message` are ours (status and events);
    `detail` is what the server said, for the operator's log only."""

    reason: ClassVar[str] = "MlflowError"
    backs_off: ClassVar[bool] = False

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class MlflowUnavailable(MlflowError):
    """MLflow did not answer, answered with a server error or too slowly: try again later."""

    reason = "Unreachable"
    backs_off = True


class MlflowRefused(MlflowError):
    """MLflow answered, but with a client error (401, 403, a redirect...): not a backoff."""

    reason = "Refused"


class MlflowBadAnswer(MlflowError):
    """MLflow answered with something that is not what its API answers."""

    reason = "BadAnswer"


class ModelOwnership(BaseModel):
    """Whether a registered model exists, and the namespace its owner tag names (None: none)."""

    registered: bool
    owner: str | None = None


class MlflowReader(Protocol):
    tracking_uri: str

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> Outcome | None:
        """The TrainingRun's parent run as an Outcome; None while there is none."""

    def resolve_alias(self, model: str, alias: str) -> int | None:
        """The version the alias points at; None when the model or alias does not exist."""

    def model_ownership(self, model: str) -> ModelOwnership:
        """Whether the registered model exists and which namespace owns it."""


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


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Experiment(_Answer):
    experiment_id: str


class _ExperimentsPage(_Answer):
    experiments: list[_Experiment] = []
    next_page_token: str | None = None


class _Tag(_Answer):
    key: str
    value: str = ""


class _RunInfo(_Answer):
    run_id: str
    status: str = "RUNNING"


class _RunData(_Answer):
    tags: list[_Tag] = []


class _Run(_Answer):
    info: _RunInfo
    data: _RunData = _RunData()

    def tags(self) -> dict[str, str]:
        return {t.key: t.value for t in self.data.tags}


class _RunAnswer(_Answer):
    run: _Run


class _RunsPage(_Answer):
    runs: list[_Run] = []


class _Version(_Answer):
    version: int


class _AliasAnswer(_Answer):
    model_version: _Version


class _RegisteredModel(_Answer):
    tags: list[_Tag] = []


class _RegisteredModelAnswer(_Answer):
    registered_model: _RegisteredModel


class _MlflowErrorBody(_Answer):
    error_code: str = ""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: it would take the request (and any
    credentials) to a host nobody allowed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


Parsed = TypeVar("Parsed", bound=_Answer)


class RestMlflowReader:
    def __init__(self, tracking_uri: str, timeout: float = 5.0, *, credentials: bool) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self.timeout = timeout
        self.credentials = credentials
        self._opener = urllib.request.build_opener(_NoRedirects)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if not self.credentials:
            return headers
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

    def _read(self, response: HTTPResponse, deadline: float, limit: int) -> bytes:
        """The body, read a piece at a time so that neither a huge nor a dripping answer
        holds the handler thread past the call's deadline."""
        chunks, size = [], 0
        while chunk := response.read1(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise MlflowBadAnswer(f"MLflow's answer was larger than {limit} bytes")
            if time.monotonic() > deadline:
                raise MlflowUnavailable(self._too_slow())
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_slow(self) -> str:
        return f"MLflow did not answer within {self.timeout * CALL_BUDGET_TIMEOUTS:g}s"

    def _call(
        self,
        path: str,
        answer: type[Parsed],
        deadline: float,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
    ) -> Parsed | None:
        """The parsed 2xx answer; None for "does not exist"; an MlflowError else."""
        url = f"{self.tracking_uri}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MlflowUnavailable(self._too_slow())
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self._headers())
        try:
            with self._opener.open(request, timeout=min(self.timeout, remaining)) as response:
                text = self._read(response, deadline, MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as error:
            self._http_error(path, error, deadline)  # raises unless "does not exist"
            return None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            detail = getattr(reason, "strerror", None) or type(reason).__name__
            raise MlflowUnavailable(f"MLflow did not answer ({detail})") from None
        try:
            return answer.model_validate_json(text or b"{}")
        except ValidationError:
            LOG.warning("MLflow at %s: unexpected answer to %s: %r", self.tracking_uri, path,
                        text[:300])  # fmt: skip
            raise MlflowBadAnswer("MLflow's answer is not what its API answers") from None

    def _http_error(self, path: str, error: urllib.error.HTTPError, deadline: float) -> None:
        """Returns for "does not exist"; raises the MlflowError the answer means else."""
        code = error.code
        try:
            text = self._read(error, deadline, MAX_ERROR_BYTES)  # type: ignore[arg-type]
        except (MlflowError, AttributeError, OSError):  # the body is for the log only
            text = b""
        finally:
            error.close()
        try:
            error_code = _MlflowErrorBody.model_validate_json(text).error_code
        except ValidationError:
            error_code = ""
        if code == 404 or (code == 400 and error_code in MISSING_CODES):
            return
        detail = text[:300].decode(errors="replace")
        LOG.warning("MLflow at %s answered %s with HTTP %d: %s", self.tracking_uri, path,
                    code, detail)  # fmt: skip
        if code >= 500 or code in RETRY_LATER_STATUSES:
            raise MlflowUnavailable(f"MLflow answered HTTP {code}", detail) from None
        if 300 <= code < 400:
            raise MlflowRefused(
                f"MLflow answered with a redirect (HTTP {code}), which is not followed", detail
            ) from None
        raise MlflowRefused(f"MLflow refused the request (HTTP {code})", detail) from None

    def _experiment_ids(self, deadline: float) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            body: dict[str, Any] = {"max_results": PAGE_SIZE, "view_type": "ALL"}
            if token:
                body["page_token"] = token
            page = self._call("experiments/search", _ExperimentsPage, deadline, body=body)
            if page is None:
                return ids
            if len(page.experiments) > PAGE_SIZE:  # what is held stays MAX_PAGES * PAGE_SIZE
                raise MlflowBadAnswer(f"MLflow listed more than {PAGE_SIZE} experiments a page")
            ids += [e.experiment_id for e in page.experiments]
            token = page.next_page_token
            if not token:
                return ids
            if token in seen:  # a server that pages in a circle: what it listed is all
                LOG.warning("MLflow at %s repeated a page token", self.tracking_uri)
                return ids
            seen.add(token)
        raise MlflowBadAnswer(f"MLflow listed experiments in more than {MAX_PAGES} pages")

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> Outcome | None:
        deadline = time.monotonic() + self.timeout * CALL_BUDGET_TIMEOUTS
        if run_id:
            found = self._call("runs/get", _RunAnswer, deadline, query={"run_id": run_id})
            if found is not None and belongs_to(found.run.tags(), uid, namespace):
                return _outcome(found.run)
        experiments = self._experiment_ids(deadline)
        if not experiments:
            return None
        body = {
            "experiment_ids": experiments,
            "filter": trainingrun_filter(uid, namespace),
            "run_view_type": "ALL",
            "max_results": 1,
            "order_by": ["attributes.start_time DESC"],
        }
        page = self._call("runs/search", _RunsPage, deadline, body=body)
        runs = [
            run for run in (page.runs if page else []) if belongs_to(run.tags(), uid, namespace)
        ]
        return _outcome(runs[0]) if runs else None

    def resolve_alias(self, model: str, alias: str) -> int | None:
        deadline = time.monotonic() + self.timeout * CALL_BUDGET_TIMEOUTS
        query = {"name": model, "alias": alias}
        found = self._call("registered-models/alias", _AliasAnswer, deadline, query=query)
        return found.model_version.version if found is not None else None

    def model_ownership(self, model: str) -> ModelOwnership:
        deadline = time.monotonic() + self.timeout * CALL_BUDGET_TIMEOUTS
        query = {"name": model}
        found = self._call("registered-models/get", _RegisteredModelAnswer, deadline, query=query)
        if found is None:
            return ModelOwnership(registered=False)
        tags = {t.key: t.value for t in found.registered_model.tags}
        return ModelOwnership(registered=True, owner=tags.get(TAG_OWNER))


def _outcome(run: _Run) -> Outcome:
    return outcome_from_tags(run.info.run_id, run.info.status, run.tags())


class ClientMlflowReader:
    """The operator's own tracking URI when it is not http(s) (file, sqlite, databricks),
    through MlflowClient (imported here, on first use)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _unavailable(self, error: Exception) -> MlflowUnavailable:
        LOG.warning("MLflow at %s: %s", self.tracking_uri, error)
        return MlflowUnavailable(f"MLflow did not answer ({type(error).__name__})", str(error))

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> Outcome | None:
        from mlflow.entities import ViewType

        try:
            client = self._client()
            experiments = [e.experiment_id for e in client.search_experiments(ViewType.ALL)]
            runs = client.search_runs(
                experiment_ids=experiments,
                filter_string=trainingrun_filter(uid, namespace),
                run_view_type=ViewType.ALL,
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
        except Exception as error:  # the client raises many kinds; all mean "not now"
            raise self._unavailable(error) from None
        runs = [r for r in runs if belongs_to(dict(r.data.tags), uid, namespace)]
        if not runs:
            return None
        run = runs[0]
        return outcome_from_tags(run.info.run_id, run.info.status, dict(run.data.tags))

    def resolve_alias(self, model: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self._client().get_model_version_by_alias(model, alias).version)
        except MlflowException as error:
            if error.error_code in MISSING_CODES:
                return None
            raise self._unavailable(error) from None
        except Exception as error:
            raise self._unavailable(error) from None

    def model_ownership(self, model: str) -> ModelOwnership:
        from mlflow.exceptions import MlflowException

        try:
            found = self._client().get_registered_model(model)
        except MlflowException as error:
            if error.error_code in MISSING_CODES:
                return ModelOwnership(registered=False)
            raise self._unavailable(error) from None
        except Exception as error:
            raise self._unavailable(error) from None
        return ModelOwnership(registered=True, owner=dict(found.tags or {}).get(TAG_OWNER))


Answer = TypeVar("Answer")


class GuardedReader:
    """A reader that, once MLflow is down, refuses calls until the backoff has passed, so
    that a down MLflow costs one timeout per backoff step, not one per object. Only
    errors that mean "down" (MlflowError.backs_off) start it; any answer resets it. The
    message it repeats is ours and names no resource (it is shared by all of them)."""

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
                MLFLOW_ERRORS.inc()
                raise MlflowUnavailable(f"{self.backoff.last_error} (next attempt in {wait:.0f}s)")
        try:
            result = call(*args)
        except MlflowError as error:
            MLFLOW_ERRORS.inc()
            with self._lock:
                if error.backs_off:
                    self.backoff.failed(time.monotonic(), error.message)
                else:
                    self.backoff.succeeded()
            raise
        with self._lock:
            self.backoff.succeeded()
        return result

    def find_outcome(self, uid: str, namespace: str, run_id: str | None = None) -> Outcome | None:
        return self._guarded(self.reader.find_outcome, uid, namespace, run_id)

    def resolve_alias(self, model: str, alias: str) -> int | None:
        return self._guarded(self.reader.resolve_alias, model, alias)

    def model_ownership(self, model: str) -> ModelOwnership:
        return self._guarded(self.reader.model_ownership, model)


_readers: OrderedDict[tuple[str, bool], GuardedReader] = OrderedDict()
_readers_lock = threading.Lock()


def reader_for(
    target: TrackingTarget, *, timeout: float = 5.0, backoff_initial: float = 2.0,
    backoff_max: float = 120.0,
) -> GuardedReader:  # fmt: skip
    """One reader (and one backoff) per tracking URI and credentials; of the readers for
    specs' URIs, the ones used last are kept, MAX_READERS in all."""
    key = (target.uri, target.credentials)
    with _readers_lock:
        reader = _readers.get(key)
        if reader is None:
            scheme = urllib.parse.urlsplit(target.uri).scheme
            inner: MlflowReader = (
                RestMlflowReader(target.uri, timeout, credentials=target.credentials)
                if scheme in ("http", "https")
                else ClientMlflowReader(target.uri)
            )
            reader = GuardedReader(inner, Backoff(backoff_initial, backoff_max))
            _readers[key] = reader
        _readers.move_to_end(key)
        # The operator's own reader (with credentials) stays: specs naming many URIs must
        # not reset the backoff that protects its MLflow.
        spare = [k for k in _readers if not k[1]]
        for old in spare[: max(0, len(_readers) - MAX_READERS)]:
            del _readers[old]
        return reader
