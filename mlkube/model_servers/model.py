"""The kserve.Model for one MLflow model URI: ready at once, loaded on the first request.

Readiness means "can serve": the model registers ready without loading weights (KServe's
ModelServer refuses not-ready models) and eviction never flips it. Loading, keeping and
evicting are the cache's job; this class only turns requests into cache use and codec calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from kserve import Model
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferRequest, InferResponse

from mlkube.model_servers.cache import LoadFailed, ModelCache
from mlkube.model_servers.codec import to_infer_response, to_json
from mlkube.model_servers.loader import LoadedModel, ModelLoader
from mlkube.model_servers.sources import UnknownModel


def json_body(payload: Any) -> Any:
    """A v1 body as parsed JSON; KServe hands over bytes when the content-type is not JSON."""
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
    ) -> None:
        super().__init__(name)
        self.uri = uri
        self._cache = cache
        self._loader = loader
        self._missing_is_404 = missing_is_404
        self._on_missing = on_missing
        self.ready = True

    # -- life ------------------------------------------------------------------------------
    def load(self) -> bool:
        self.ready = True
        return True

    def validate(self, payload: Any) -> Any:
        return payload  # the codec validates against the signature, with better messages

    async def _load(self) -> tuple[LoadedModel, int]:
        return await asyncio.to_thread(self._loader.load, self.name, self.uri)

    @contextlib.asynccontextmanager
    async def loaded(self) -> AsyncIterator[LoadedModel]:
        try:
            context = self._cache.use(self.name, self._load)
            model = await context.__aenter__()
        except UnknownModel as error:
            if self._missing_is_404:
                if self._on_missing:
                    self._on_missing(self.name)
                missing = ModelNotFound(self.name)
                missing.reason = str(error)
                raise missing from None
            raise ModelNotReady(self.name, f"Failed to load {self.uri}: {error}") from None
        except LoadFailed as error:
            raise ModelNotReady(self.name, f"Failed to load {self.uri}: {error}") from None
        try:
            yield model
        finally:
            await context.__aexit__(None, None, None)

    # -- handlers --------------------------------------------------------------------------
    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        async with self.loaded() as model:
            if isinstance(payload, InferRequest):
                rows = model.codec.decode_v2(payload)
                output = await self._run(model, rows)
                request_id = payload.id or uuid.uuid4().hex
                return to_infer_response(output, self.name, request_id, model.codec.output_name)
            rows = model.codec.decode_v1(json_body(payload))
            return {"predictions": to_json(await self._run(model, rows))}

    async def _run(self, model: LoadedModel, rows: Any) -> Any:
        try:
            return await model.batcher.submit(rows)
        except (InvalidInput, InferenceError):
            raise
        except Exception as error:
            if _is_bad_input(error):
                raise InvalidInput(str(error).splitlines()[0]) from None
            raise InferenceError(f"{type(error).__name__}: {str(error)[:500]}") from error

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        async with self.loaded() as model:
            if model.explainer is None:
                raise NotImplementedError(f"model {self.name!r} carries no explainer")
            rows = model.codec.decode_v1(json_body(payload))
            explain = model.explainer
            try:
                result = await asyncio.to_thread(explain, model.codec.concat([rows]))
            except Exception as error:
                raise InferenceError(f"explain failed: {type(error).__name__}: {error}") from error
            return {"explanations": jsonable(result)}

    # -- metadata (from the loaded model, without loading it) ------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        model = self._cache.peek(self.name)
        return model.codec.describe() if model else []

    def get_output_types(self) -> list[dict[str, Any]]:
        return []


__all__ = ["LazyModel", "json_body", "jsonable"]
