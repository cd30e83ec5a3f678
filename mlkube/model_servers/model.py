"""The kserve.Model for one MLflow model URI: registered at once, loaded on the first request.

Two readinesses. KServe's own (`ready`, `healthy()`) is True from the start, because KServe's
ModelServer refuses models that are not ready and its predict path asks it: the first request
must be able to load the model. What probes see (`can_serve()`, wired in by server.py) is
honest: the version is resolved, its artifacts are complete on local disk, they loaded once
in a trial load (whose model is dropped: memory still fills on the first request), and the
last load did not fail. Eviction from memory never changes it. Loading, keeping and evicting
are the cache's job; this class turns requests into cache use and codec calls, and decodes
large requests off the event loop so probes answer while they are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from kserve import Model
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferRequest, InferResponse

from mlkube.model_servers.cache import LoadFailed, ModelCache
from mlkube.model_servers.codec import (
    Rows,
    check_rows,
    check_v2_shapes,
    to_infer_response,
    to_json,
    v1_rows,
)
from mlkube.model_servers.loader import LoadedModel, ModelLoader, ModelMetadata, Unloadable
from mlkube.model_servers.sources import UnknownModel

log = logging.getLogger(__name__)

INLINE_ROWS = 256  # smaller requests are decoded on the event loop: a thread hop costs more
INLINE_BYTES = 64 * 2**10  # smaller v1 bodies are parsed on the event loop, for the same reason
PREPARE_RETRY_SECONDS = 5.0  # between attempts to resolve and download for readiness
_URL = re.compile(r"\b(?!models:/)[A-Za-z][A-Za-z0-9+.-]*:/+[^\s'\"]*")
_PATH = re.compile(r"(?<![\w.:/<])/[^\s'\"]+")
_HOST = re.compile(r"host='[^']*'|port=\d+")  # urllib3's "HTTPConnectionPool(host=..., port=...)"


def public_reason(text: str, limit: int = 300) -> str:
    """What a client may see of an internal error: no MLflow URLs, no artifact paths, short.
    The server log keeps the whole message."""
    text = _URL.sub("<url>", text.splitlines()[0] if text else "")
    text = _HOST.sub("<host>", _PATH.sub("<path>", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_body(payload: Any) -> Any:
    """A v1 body as parsed JSON (server.py's DataPlane hands it over as bytes)."""
    if isinstance(payload, bytes | bytearray | str):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            raise InvalidInput(f"malformed JSON: {error}") from None
    return payload


def jsonable(value: Any) -> Any:
    """Explanations may hold numpy values; make them plain JSON."""
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict(orient="records")
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _is_bad_input(error: Exception) -> bool:
    """MLflow's own schema enforcement rejects input with INVALID_PARAMETER_VALUE."""
    return getattr(error, "error_code", None) == "INVALID_PARAMETER_VALUE"


class LazyModel(Model):
    def __init__(
        self,
        name: str,
        uri: str,
        cache: ModelCache[LoadedModel],
        loader: ModelLoader,
        missing_is_404: bool = False,
        on_missing: Callable[[str], None] | None = None,
        max_request_rows: int | None = None,
        on_unloadable: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(name)
        self.uri = uri
        self._cache = cache
        self._loader = loader
        self._missing_is_404 = missing_is_404
        self._on_missing = on_missing
        self._on_unloadable = on_unloadable  # (uri, why): the version will never load
        self.max_request_rows = max_request_rows
        self.ready = True
        self.unloadable: str | None = None  # why the version cannot load, once it could not
        self._preparing: threading.Thread | None = None
        self._prepare_after = 0.0
        self._trial_loaded = False  # the artifacts on disk loaded once (see _prepare)
        self._in_flight = 0  # predict requests between arrival and answer

    # -- life ------------------------------------------------------------------------------
    def load(self) -> bool:
        self.ready = True
        return True

    def validate(self, payload: Any) -> Any:
        return payload  # the codec validates against the signature, with better messages

    async def _load(self) -> tuple[LoadedModel, int]:
        loaded = await asyncio.to_thread(self._loader.load, self.name, self.uri)
        self.unloadable = None
        return loaded

    # -- readiness probes ------------------------------------------------------------------
    def can_serve(self) -> bool:
        """Resolved, artifacts verified on local disk, and loadable. Starts the resolve,
        download and trial load in the background when they are missing."""
        if self.unloadable is not None:
            return False
        if self._trial_loaded and self._loader.on_disk(self.uri):
            return True
        self.prepare_soon()
        return False

    def prepare_soon(self) -> None:
        """Resolve and download in a thread, one at a time, at most every few seconds."""
        if self._preparing is not None and self._preparing.is_alive():
            return
        if time.monotonic() < self._prepare_after:
            return
        self._preparing = threading.Thread(target=self._prepare, daemon=True)
        self._preparing.start()

    def _prepare(self) -> None:
        """Download, then load once and drop the model: a version whose files download but
        do not load (a damaged upload) must never take traffic, so readiness waits for this.
        The cache still loads on the first request and evicts after the TTL."""
        try:
            self._loader.prefetch(self.uri)
            self._loader.load(self.name, self.uri)
        except Unloadable as error:
            self.unloadable = str(error)
            log.warning("%s does not load; it will never be ready: %s", self.uri, error)
            if self._on_unloadable:
                self._on_unloadable(self.uri, public_reason(str(error)))
        except Exception as error:  # readiness stays false; a request would say why
            self._prepare_after = time.monotonic() + PREPARE_RETRY_SECONDS
            log.warning("preparing %s failed: %s", self.uri, error)
        else:
            self._trial_loaded = True

    @contextlib.asynccontextmanager
    async def loaded(self) -> AsyncIterator[LoadedModel]:
        if self.unloadable is not None:  # known not to load: no download per request
            reason = public_reason(self.unloadable)
            raise ModelNotReady(self.name, f"Failed to load {self.uri}: {reason}")
        try:
            context = self._cache.use(self.name, self._load)
            model = await context.__aenter__()
        except UnknownModel as error:
            raise self._unknown(error) from None
        except LoadFailed as error:
            if isinstance(error.__cause__, Unloadable):
                self.unloadable = str(error.__cause__)
            reason = public_reason(str(error))
            raise ModelNotReady(self.name, f"Failed to load {self.uri}: {reason}") from None
        try:
            yield model
        finally:
            await context.__aexit__(None, None, None)

    def _unknown(self, error: UnknownModel) -> Exception:
        """A name or version MLflow does not know: 404 in multi-model mode, else 503."""
        if not self._missing_is_404:
            reason = public_reason(str(error))
            not_ready: Exception = ModelNotReady(self.name, f"Failed to load {self.uri}: {reason}")
            return not_ready
        if self._on_missing:
            self._on_missing(self.name)
        missing: Exception = ModelNotFound(self.name)
        missing.reason = str(error)  # type: ignore[attr-defined]
        return missing

    # -- handlers --------------------------------------------------------------------------
    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        self._in_flight += 1
        try:
            async with self.loaded() as model:
                if isinstance(payload, InferRequest):
                    rows = await self._decode(model, payload)
                    alone = self._in_flight == 1
                    output = await self._run(model, rows, alone, one_by_one=payload.from_grpc)
                    request_id = payload.id or uuid.uuid4().hex
                    return to_infer_response(
                        output, self.name, request_id, model.codec.output_name, payload
                    )
                rows = await self._decode(model, payload)
                output = await self._run(model, rows, self._in_flight == 1)
                return {"predictions": to_json(output)}
        finally:
            self._in_flight -= 1

    async def _decode(self, model: LoadedModel, payload: Any) -> Rows:
        """The request as model input; big ones are parsed and converted in a thread."""
        if isinstance(payload, InferRequest):
            rows = check_v2_shapes(payload)
            check_rows(rows, self.max_request_rows)
            if rows <= INLINE_ROWS:
                return model.codec.decode_v2(payload)
            return await asyncio.to_thread(model.codec.decode_v2, payload)
        if isinstance(payload, bytes | bytearray | str) and len(payload) > INLINE_BYTES:
            return await asyncio.to_thread(self._decode_v1, model, payload)
        body = json_body(payload)
        if v1_rows(body) <= INLINE_ROWS:
            return self._decode_v1(model, body)
        return await asyncio.to_thread(self._decode_v1, model, body)

    def _decode_v1(self, model: LoadedModel, payload: Any) -> Rows:
        body = json_body(payload)
        check_rows(v1_rows(body), self.max_request_rows)
        return model.codec.decode_v1(body)

    async def _run(
        self, model: LoadedModel, rows: Any, alone: bool, one_by_one: bool = False
    ) -> Any:
        try:
            return await model.batcher.submit(rows, alone=alone, one_by_one=one_by_one)
        except (InvalidInput, InferenceError):
            raise
        except Exception as error:
            if _is_bad_input(error):
                raise InvalidInput(public_reason(str(error), 500)) from None
            reason = public_reason(str(error), 500)
            raise InferenceError(f"{type(error).__name__}: {reason}") from error

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        async with self.loaded() as model:
            if model.explainer is None:
                raise NotImplementedError(f"model {self.name!r} carries no explainer")
            rows = await self._decode(model, payload)
            explain = model.explainer
            try:
                result = await asyncio.to_thread(explain, model.codec.concat([rows]))
            except Exception as error:
                raise InferenceError(f"explain failed: {type(error).__name__}: {error}") from error
            return {"explanations": jsonable(result)}

    # -- metadata (from the signature on disk, without loading the model) -----------------
    async def get_input_types(self) -> list[dict[str, Any]]:
        return (await self._metadata()).inputs

    async def get_output_types(self) -> list[dict[str, Any]]:
        return (await self._metadata()).outputs

    async def _metadata(self) -> ModelMetadata:
        try:
            return await asyncio.to_thread(self._loader.metadata, self.uri)
        except UnknownModel as error:
            raise self._unknown(error) from None
        except Exception as error:
            log.warning("metadata of %s failed: %s", self.uri, error)
            raise ModelNotReady(self.name, public_reason(str(error))) from None


__all__ = ["LazyModel", "json_body", "jsonable"]
