"""Process wiring: settings -> caches, loader, models -> a KServe ModelServer.

Heavy imports (kserve, mlflow, the flavours) happen here, at start-up, not on a request.
What KServe does not do and this file adds: a request-size cap in front of every route, v2
bodies parsed off the event loop, readiness that means "can serve", MLflow calls with
timeouts, and an exit within the pod's grace period after SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent import futures
from pathlib import Path
from typing import Any

import orjson

from mlkube.api.modeldeployment import UNLOADABLE_EXIT_CODE
from mlkube.model_servers.settings import ServerSettings

log = logging.getLogger("mlkube.model_servers")
# The kubelet keeps at most this much of a container's termination message.
TERMINATION_MESSAGE_BYTES = 4096


def quiet_fastapi() -> None:
    """KServe 0.21 builds ORJSONResponse per request and FastAPI 0.150 warns (~1 KB) each time."""
    try:
        from fastapi.exceptions import FastAPIDeprecationWarning
    except ImportError:  # older FastAPI: nothing to silence
        return
    warnings.filterwarnings(
        "ignore", message=r"ORJSONResponse is deprecated", category=FastAPIDeprecationWarning
    )


def quiet_request_logs() -> None:
    """No line per request: uvicorn's access log (as uvicorn's own `access_log=False` does)
    and KServe's timing lines (two a request). Errors are still logged."""
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)


def configure_logging() -> None:
    """Our INFO lines (loads, evictions, batching) beside KServe's, in the same shape."""
    logger = logging.getLogger("mlkube")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d %(process)s %(name)s %(levelname)s %(message)s",
                "%Y-%m-%d %H:%M:%S",
            )
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_thread_env(threads: int | None) -> None:
    """OpenMP reads its thread count per thread from the environment at start-up, so predicts
    in worker threads only see a limit set here, before numpy, sklearn or torch load.
    Variables the user set win."""
    if threads:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, str(threads))


def mlflow_client_env(settings: ServerSettings) -> dict[str, str]:
    """Every MLflow HTTP call of the predictor (resolve, download) gets a timeout and a few
    quick retries; MLflow's defaults (120 s, 7 retries, backoff 2) held requests for minutes."""
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(settings.mlflow_timeout),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.mlflow_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }


def prepare_environment(settings: ServerSettings) -> None:
    if settings.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    os.environ.update(mlflow_client_env(settings))
    from mlkube.model_servers.artifacts import private_dir

    private_dir(settings.cache_dir)
    # torch.export models compile into this cache; keep it with ours, not in $TMPDIR
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "torchinductor"))
    quiet_fastapi()


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _host_grpc_server(host: str, access_log: bool) -> Any:
    """KServe 0.21's GRPCServer binds [::] with no option and logs a line per call; this one
    binds `host` ([::] for 0.0.0.0 and ::, as KServe does) and logs calls only with
    `access_log`. ModelInfer, the hot path, maps its errors to status codes itself, with
    KServe's mapping: the interceptor that does it for the other methods builds a new method
    handler and wrapper coroutine for every call."""
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    class ErrorsToStatus(ExceptionToStatusInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method == MODEL_INFER:
                return await continuation(details)
            return await super().intercept_service(continuation, details)

    errors = ErrorsToStatus()

    class Servicer(InferenceServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's)
            try:
                return await super().ModelInfer(request, context)
            except Exception as error:
                await errors.handle_exception(error, request, context, MODEL_INFER)
                raise  # handle_exception aborts the call; never reached

    class HostGRPCServer(GRPCServer):
        async def start(self, max_workers: int) -> None:
            servicer = Servicer(self._data_plane, self._model_repository_extension)
            interceptors = (LoggingInterceptor(),) if access_log else ()
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(*interceptors, errors),
                options=[
                    (
                        "grpc.max_send_message_length",
                        self._kwargs.get("grpc_max_send_message_length"),
                    ),
                    (
                        "grpc.max_receive_message_length",
                        self._kwargs.get("grpc_max_receive_message_length"),
                    ),
                ],
            )
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                servicer, self._server
            )
            address = "[::]" if host in ("0.0.0.0", "::") else host
            self._server.add_insecure_port(f"{address}:{self._port}")
            log.info("gRPC listening on %s:%d", address, self._port)
            await self._server.start()
            await self._server.wait_for_termination()

    return HostGRPCServer


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_V2_MODELS, _INFER = "/v2/models/", "/infer"


def v2_infer_target(scope: MutableMapping[str, Any]) -> str | None:
    """The model name of a `POST /v2/models/{name}/infer`, else None."""
    path: str = scope.get("path", "")
    if scope.get("method") != "POST" or not path.startswith(_V2_MODELS):
        return None
    if not path.endswith(_INFER):
        return None
    name = path[len(_V2_MODELS) : -len(_INFER)]
    return name if name and "/" not in name else None


class FrontDoor:
    """The outermost ASGI app, in front of KServe's FastAPI app.

    - A body over `max_bytes` is refused with a 413 before anything parses it, whether its
      Content-Length says so or it streams past the cap; bodies under it are read here and
      handed on whole, so memory stays within one body.
    - `POST /v2/models/{name}/infer`, the hot path, is answered here: the same steps as
      KServe's route (readiness, decode, DataPlane.infer, encode; errors through KServe's
      own exception handlers, so the answers are the same), without FastAPI's routing and
      middleware stack and KServe's per-request timing log, which together cost more than
      the prediction of one row. Large bodies are parsed in a thread, so probes answer
      meanwhile. The model's Prometheus histograms are kept (DataPlane.infer records them).
    - Everything else goes to the app unchanged.
    """

    def __init__(self, app: Any, dataplane: Any, max_bytes: int) -> None:
        self.app, self.dataplane, self.max_bytes = app, dataplane, max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        name = v2_infer_target(scope)
        if name is not None:
            await self._infer(name, body, scope, receive, send)
            return
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)

    async def _read_body(
        self, scope: MutableMapping[str, Any], receive: Any, send: Any
    ) -> bytes | None:
        """The whole body, or None once refused (413) or when the client went away."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(
        self, name: str, body: bytes, scope: MutableMapping[str, Any], receive: Any, send: Any
    ) -> None:
        from kserve.errors import ModelNotReady

        from mlkube.model_servers.model import INLINE_BYTES

        dataplane = self.dataplane
        headers = {
            key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope.get("headers") or []
        }
        try:
            if not await dataplane.model_ready(name, True):
                raise ModelNotReady(name)
            if len(body) > INLINE_BYTES:
                request = await asyncio.to_thread(parse_v2_body, body, headers, name)
            else:
                request = parse_v2_body(body, headers, name)
            response, response_headers = await dataplane.infer(
                model_name=name, request=request, headers=headers
            )
            response, encoded_headers = dataplane.encode(
                model_name=name, response=response, headers=headers, req_attributes={}
            )
        except Exception as error:
            handler = _handler_for(self.app, error)
            if handler is None:
                raise
            answer = await handler(None, error)
            await answer(scope, receive, send)
            return
        response_headers.update(encoded_headers)
        response_headers.pop("content-length", None)
        if isinstance(response, bytes):
            content = response  # the binary data extension: headers say where the JSON ends
        else:
            response_headers["content-type"] = "application/json"
            content = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        response_headers["content-length"] = str(len(content))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers.items()
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _refuse(self, send: Any) -> None:
        content = orjson.dumps(
            {
                "error": f"request body is larger than this server's limit of "
                f"{self.max_bytes} bytes (max_request_bytes)"
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


def _header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return bytes(value)
    return None


def _handler_for(app: Any, error: Exception) -> Any:
    """The app's exception handler for `error` (the nearest class in its MRO), as Starlette
    picks it."""
    handlers = getattr(app, "exception_handlers", {})
    for cls in type(error).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


def parse_v2_body(body: bytes, headers: dict[str, str], model_name: str) -> Any:
    """A REST v2 body as kserve's InferRequest (blocking: large ones run in a thread)."""
    from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferRequest
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    json_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
    if json_length is not None:
        return InferRequest.from_bytes(body, int(json_length), model_name)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"malformed JSON: {error}") from None
    try:
        request = InferenceRequest.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"v2 request: {where}: {first['msg']}") from None
    return InferRequest.from_inference_request(request, model_name)


def honest_dataplane(registry: Any, required: list[str]) -> Any:
    """KServe's DataPlane with readiness that means "can serve" and v1 JSON left undecoded.

    KServe asks `model_ready(name, True)` on every predict: that stays KServe's (True at
    once), so the first request may load the model. Probes ask `model_ready(name)` and
    `ready()`: those also need the model's `can_serve()`. `ready()` checks the models the
    server started with (single-model mode); in multi-model mode one broken model must not
    take the others out of the Service. v1 bodies go to LazyModel as bytes, which parses big
    ones off the event loop."""
    from kserve.protocol.dataplane import DataPlane

    class HonestDataPlane(DataPlane):
        async def model_ready(
            self, model_name: str, disable_predictor_health_check: bool = False
        ) -> bool:
            ready = bool(await super().model_ready(model_name, disable_predictor_health_check))
            if disable_predictor_health_check or not ready:
                return ready
            model = self._model_registry.get_model(model_name)
            can_serve = getattr(model, "can_serve", None)
            return bool(can_serve()) if can_serve is not None else ready

        async def ready(self) -> bool:
            for name in required:
                if not await self.model_ready(name):
                    return False
            return bool(await super().ready())

        def decode(
            self,
            body: Any,
            headers: Any,
            protocol_version: str = "v1",
            model_name: str | None = None,
        ) -> Any:
            if (
                isinstance(body, bytes)
                and protocol_version.lower() == "v1"
                and not any(k.lower().startswith("ce-") for k in headers or {})
            ):
                return body, {}
            return super().decode(body, headers, protocol_version, model_name)

    return HonestDataPlane(model_registry=registry)


def exit_within(seconds: float) -> None:
    """A last resort after SIGTERM: threads stuck in a library call must not keep the pod
    past its grace period (KServe's shutdown waits for them)."""

    def force() -> None:
        log.warning("still running %.0f s after SIGTERM; exiting now", seconds)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def make_model_server(settings: ServerSettings, repository: Any, required: list[str]) -> Any:
    from kserve import model_server as kms

    class MlkubeModelServer(kms.ModelServer):
        """KServe's ModelServer, bound to `settings.host` (loopback for local mode)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)  # configures KServe's logging
            if not settings.access_log:
                quiet_request_logs()
            self.dataplane = honest_dataplane(self.registered_models, required)
            self._exit_timer_started = False

        def start(self, models: list[Any]) -> None:
            self._own_grpc = bool(getattr(self, "enable_grpc", False))
            self.enable_grpc = False  # ours is started in _serve instead of KServe's
            # gRPC refuses messages over the same cap as REST bodies
            kms.args.grpc_max_receive_message_length = settings.max_request_bytes
            super().start(models)

        def stop(self, sig: int) -> None:
            self._start_exit_timer()
            super().stop(sig)

        def _start_exit_timer(self) -> None:
            if not self._exit_timer_started:
                self._exit_timer_started = True
                exit_within(settings.shutdown_seconds)

        async def _serve(self) -> None:
            if self._rest_server is not None:
                config = self._rest_server.config  # uvicorn reads it at serve()
                config.host = settings.host
                config.app = FrontDoor(kms.app, self.dataplane, settings.max_request_bytes)
                uvicorn_server = self._rest_server._server
                handle_exit = uvicorn_server.handle_exit

                def on_signal(sig: int, frame: Any) -> None:
                    # uvicorn holds SIGTERM while it serves: the clock starts here
                    self._start_exit_timer()
                    handle_exit(sig, frame)

                uvicorn_server.handle_exit = on_signal
            if getattr(self, "_own_grpc", False):
                server_class = _host_grpc_server(settings.host, settings.access_log)
                self._grpc_server = server_class(
                    self.grpc_port,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs=vars(kms.args),
                    grace_period=self.grace_period,
                )
                self.servers.append(self._grpc_server.start(self.max_threads))
            await super()._serve()

    return MlkubeModelServer(
        http_port=settings.http_port,
        grpc_port=settings.grpc_port,
        enable_grpc=settings.enable_grpc,
        registered_models=repository,
        workers=1,  # one process: the memory cache is per process
        enable_latency_logging=False,
        predictor_config=None,
        # uvicorn's and gRPC's graceful shutdown end before our forced exit
        grace_period=max(1, int(settings.shutdown_seconds) - 5),
    )


def build(settings: ServerSettings) -> tuple[Any, list[Any], Any]:
    """(model_server, models to start, loader); nothing is listening yet."""
    limit_thread_env(settings.predict_threads)  # before the imports below load OpenMP
    from kserve.model_repository import ModelRepository

    from mlkube.model_servers.artifacts import ArtifactCache
    from mlkube.model_servers.cache import CachePolicy, ModelCache
    from mlkube.model_servers.loader import LoadedModel, ModelLoader, limit_threads, warm_up
    from mlkube.model_servers.metrics import ServerMetrics
    from mlkube.model_servers.model import LazyModel
    from mlkube.model_servers.repository import RegistryModelRepository
    from mlkube.model_servers.sources import UnknownModel, owned_by, resolve

    configure_logging()
    prepare_environment(settings)
    warm_up()
    metrics = ServerMetrics()
    artifacts = ArtifactCache(
        settings.cache_dir / "artifacts",
        settings.disk_cache_bytes,
        on_download=metrics.downloaded,
        on_hit=metrics.disk_hit,
    )
    # A server of one namespace's models: every name is checked against its owner tag.
    resolver = owned_by(settings.owner_namespace) if settings.owner_namespace else resolve
    loader = ModelLoader(
        artifacts,
        settings.max_batch_rows,
        on_batch=metrics.batch,
        resolver=resolver,
    )
    limit_threads(settings.predict_threads)
    policy = CachePolicy(
        ttl_seconds=settings.ttl_seconds or None,
        budget_bytes=settings.memory_budget,
        passthrough=(UnknownModel,),
    )
    cache: ModelCache[LoadedModel] = ModelCache(policy, metrics)

    if settings.multi_model:

        def factory(name: str) -> LazyModel:
            return LazyModel(
                name,
                repository.uri_for(name),
                cache,
                loader,
                missing_is_404=True,
                on_missing=repository.forget,
                max_request_rows=settings.max_request_rows,
            )

        repository = RegistryModelRepository(factory, settings.alias, exists=resolver)
        # no model to register up front: KServe starts with an empty list (models come by name)
        return make_model_server(settings, repository, []), [], loader
    if settings.models:
        served = settings.models
    else:
        assert settings.model_uri and settings.model_name
        served = {settings.model_name: settings.model_uri}
    # Each model has its own readiness (/v2/models/{name}/ready) and metrics (label
    # model); the server is ready when all of them are (their versions are pinned).
    exits = settings.exit_if_unloadable
    on_unloadable = exit_unloadable(settings.termination_log) if exits else None
    models = [
        LazyModel(
            name, uri, cache, loader,
            max_request_rows=settings.max_request_rows, on_unloadable=on_unloadable,
        )
        for name, uri in served.items()
    ]  # fmt: skip
    server = make_model_server(settings, ModelRepository(), [model.name for model in models])
    return server, models, loader


def exit_unloadable(termination_log: Path) -> Callable[[str, str], None]:
    """What --exit-if-unloadable does once a pinned version is known not to load: say why
    where Kubernetes reads a container's last words, then exit with UNLOADABLE_EXIT_CODE.
    Nothing is lost: that model never served, and the server serves nothing else."""

    def leave(uri: str, why: str) -> None:
        message = f"{uri} does not load: {why}"
        log.error("%s; exiting with status %d", message, UNLOADABLE_EXIT_CODE)
        try:
            termination_log.write_text(message[:TERMINATION_MESSAGE_BYTES])
        except OSError as error:
            log.warning("could not write %s: %s", termination_log, error)
        logging.shutdown()
        os._exit(UNLOADABLE_EXIT_CODE)  # from the preparing thread: no clean shutdown to wait for

    return leave


def run(settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    server, models, _ = build(settings)
    from mlkube.model_servers.loader import freeze_long_lived

    freeze_long_lived()  # everything imported so far lives as long as the process
    if settings.prefetch:
        # Resolve and download (not load) in the background while the server listens; the
        # readiness probe answers "not ready" until the artifacts are verified on disk.
        for model in models:
            model.prepare_soon()
    log.info(
        "serving %s on %s:%d",
        settings.model_uri or ", ".join(settings.models) or "registered models by name",
        settings.host,
        settings.http_port,
    )
    server.start(models)
