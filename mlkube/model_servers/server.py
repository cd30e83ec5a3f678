"""Process wiring: settings -> caches, loader, models -> a KServe ModelServer.

Heavy imports (kserve, mlflow, the flavours) happen here, at start-up, not on a request.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from concurrent import futures
from typing import Any

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


def prepare_environment(settings: ServerSettings) -> None:
    if settings.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
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


def make_model_server(settings: ServerSettings, repository: Any) -> Any:
    from kserve import model_server as kms

    class MlkubeModelServer(kms.ModelServer):
        """KServe's ModelServer, bound to `settings.host` (loopback for local mode)."""

        def start(self, models: list[Any]) -> None:
            enabled: bool = getattr(self, "enable_grpc", False)
            self._own_grpc = enabled and settings.host not in ("0.0.0.0", "::")
            if self._own_grpc:
                self.enable_grpc = False  # started in _serve, on our host
            super().start(models)

        async def _serve(self) -> None:
            if self._rest_server is not None:
                self._rest_server.config.host = settings.host  # uvicorn binds at serve()
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
            )

        repository = RegistryModelRepository(factory, settings.alias)
        # no model to register up front: KServe starts with an empty list (models come by name)
        return make_model_server(settings, repository), [], loader
    assert settings.model_uri and settings.model_name
    model = LazyModel(settings.model_name, settings.model_uri, cache, loader)
    server = make_model_server(settings, ModelRepository())
    return server, [model], loader


def run(settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    server, models, loader = build(settings)
    if settings.model_uri and settings.prefetch:
        # Artifacts local before we listen, so the first request only reads them; an MLflow
        # that is slow or down delays the start by at most prefetch_wait (then 503s explain).
        prefetch = threading.Thread(
            target=_prefetch, args=(loader, settings.model_uri), daemon=True
        )
        prefetch.start()
        prefetch.join(settings.prefetch_wait)
    log.info(
        "serving %s on %s:%d",
        settings.model_uri or "registered models by name",
        settings.host,
        settings.http_port,
    )
    server.start(models)


def _prefetch(loader: Any, uri: str) -> None:
    try:
        loader.prefetch(uri)
    except Exception as error:  # the first request will report it
        log.warning("prefetch of %s failed: %s", uri, error)
