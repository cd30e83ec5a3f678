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
from typing import Any

import orjson
from fastapi import Request, Response  # module level: FastAPI resolves route annotations here

from mlkube.model_servers.settings import ServerSettings

log = logging.getLogger("mlkube.model_servers")


def quiet_fastapi() -> None:
    """KServe 0.21 builds ORJSONResponse per request and FastAPI 0.150 warns (~1 KB) each time."""
    try:
        from fastapi.exceptions import FastAPIDeprecationWarning
    except ImportError:  # older FastAPI: nothing to silence
        return
    warnings.filterwarnings(
        "ignore", message=r"ORJSONResponse is deprecated", category=FastAPIDeprecationWarning
    )


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


def _host_grpc_server(host: str) -> Any:
    """KServe 0.21's GRPCServer binds [::] with no option; this one binds `host`."""
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    class HostGRPCServer(GRPCServer):
        async def start(self, max_workers: int) -> None:
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
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
            self._server.add_insecure_port(f"{host}:{self._port}")
            log.info("gRPC listening on %s:%d", host, self._port)
            await self._server.start()
            await self._server.wait_for_termination()

    return HostGRPCServer


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is refused with a 413 before the app sees it,
    whether its Content-Length says so or it streams past the cap. Bodies under it are read
    here and handed on whole, so memory stays within one body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)

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


def add_v2_infer_route(app: Any, dataplane: Any) -> None:
    """/v2/models/{name}/infer in front of KServe's, which parses and validates the JSON on the
    event loop (a big body stalled the readiness probe for seconds); this one does it in a
    thread when the body is large. Same answers otherwise."""
    from kserve.errors import ModelNotReady

    from mlkube.model_servers.model import INLINE_BYTES

    async def infer(model_name: str, request: Request) -> Response:
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        body = await request.body()
        headers = dict(request.headers)
        if len(body) > INLINE_BYTES:
            infer_request = await asyncio.to_thread(parse_v2_body, body, headers, model_name)
        else:
            infer_request = parse_v2_body(body, headers, model_name)
        response, response_headers = await dataplane.infer(
            model_name=model_name, request=infer_request, headers=headers
        )
        response, encoded_headers = dataplane.encode(
            model_name=model_name, response=response, headers=headers, req_attributes={}
        )
        response_headers.update(encoded_headers)
        response_headers.pop("content-length", None)
        if isinstance(response, bytes):
            return Response(content=response, headers=response_headers)
        response_headers.pop("content-type", None)
        content = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(content, media_type="application/json", headers=response_headers)

    app.add_api_route("/v2/models/{model_name}/infer", infer, methods=["POST"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of KServe's own


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
            super().__init__(**kwargs)
            self.dataplane = honest_dataplane(self.registered_models, required)
            self._exit_timer_started = False

        def start(self, models: list[Any]) -> None:
            enabled: bool = getattr(self, "enable_grpc", False)
            self._own_grpc = enabled and settings.host not in ("0.0.0.0", "::")
            if self._own_grpc:
                self.enable_grpc = False  # started in _serve, on our host
            # gRPC refuses messages over the same cap as REST bodies
            kms.args.grpc_max_receive_message_length = settings.max_request_bytes
            kms.app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
            add_v2_infer_route(kms.app, self.dataplane)
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
                self._rest_server.config.host = settings.host  # uvicorn binds at serve()
                uvicorn_server = self._rest_server._server
                handle_exit = uvicorn_server.handle_exit

                def on_signal(sig: int, frame: Any) -> None:
                    # uvicorn holds SIGTERM while it serves: the clock starts here
                    self._start_exit_timer()
                    handle_exit(sig, frame)

                uvicorn_server.handle_exit = on_signal
            if getattr(self, "_own_grpc", False):
                server_class = _host_grpc_server(settings.host)
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
    from mlkube.model_servers.sources import UnknownModel

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
    loader = ModelLoader(
        artifacts,
        settings.max_batch_rows,
        on_batch=metrics.batch,
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

        repository = RegistryModelRepository(factory, settings.alias)
        # no model to register up front: KServe starts with an empty list (models come by name)
        return make_model_server(settings, repository, []), [], loader
    assert settings.model_uri and settings.model_name
    model = LazyModel(
        settings.model_name,
        settings.model_uri,
        cache,
        loader,
        max_request_rows=settings.max_request_rows,
    )
    server = make_model_server(settings, ModelRepository(), [model.name])
    return server, [model], loader


def run(settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    server, models, _ = build(settings)
    if settings.prefetch:
        # Resolve and download (not load) in the background while the server listens; the
        # readiness probe answers "not ready" until the artifacts are verified on disk.
        for model in models:
            model.prepare_soon()
    log.info(
        "serving %s on %s:%d",
        settings.model_uri or "registered models by name",
        settings.host,
        settings.http_port,
    )
    server.start(models)
