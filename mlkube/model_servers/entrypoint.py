"""`python -m mlkube.model_servers ...`: the predictor container's command line."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from pydantic import ValidationError

from mlkube.api.manifest import format_validation_error
from mlkube.model_servers.settings import ServerSettings


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line and exit status 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Options left out take ServerSettings' defaults, which are written only there."""
    parser.add_argument(
        "--model-uri",
        "--model_uri",
        dest="model_uri",
        help="models:/name/version, models:/name@alias, runs:/... or a path",
    )
    parser.add_argument(
        "--model-name",
        "--model_name",
        dest="model_name",
        help="endpoint name (default: the registered model name)",
    )
    parser.add_argument(
        "--multi-model",
        action="store_true",
        help="serve any registered model by name (models:/{name}@{alias})",
    )
    parser.add_argument("--alias", help="alias for --multi-model")
    parser.add_argument(
        "--serve-model",
        dest="serve_model",
        action="append",
        metavar="NAME=URI",
        help="serve the model at URI as NAME; repeat for several models in one server",
    )
    parser.add_argument(
        "--owner-namespace",
        dest="owner_namespace",
        help="serve only registered models owned by this namespace (tag "
        "mlkube.owner.namespace); others are not found",
    )
    parser.add_argument(
        "--ttl-seconds",
        "--ttl_seconds",
        dest="ttl_seconds",
        type=float,
        help="evict after this many idle seconds (0: never)",
    )
    parser.add_argument(
        "--memory-budget",
        "--memory_budget",
        dest="memory_budget",
        help="bytes of loaded models, e.g. 512Mi; least recently used go first",
    )
    parser.add_argument("--protocol", choices=["v1", "v2", "grpc-v2"])
    parser.add_argument("--http_port", "--http-port", dest="http_port", type=int)
    parser.add_argument("--grpc_port", "--grpc-port", dest="grpc_port", type=int)
    parser.add_argument(
        "--enable_grpc",
        "--enable-grpc",
        dest="enable_grpc",
        choices=["true", "false"],
    )
    parser.add_argument("--host", help="listen address (pods: 0.0.0.0)")
    parser.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI")
    parser.add_argument("--cache-dir", dest="cache_dir", help="disk cache of model artifacts")
    parser.add_argument("--disk-cache-size", dest="disk_cache_bytes")
    parser.add_argument("--max-batch-rows", dest="max_batch_rows", type=int)
    parser.add_argument(
        "--predict-threads",
        dest="predict_threads",
        type=int,
        help="OpenMP/BLAS/torch threads per predict (default 1: best for small requests)",
    )
    parser.add_argument(
        "--max-request-bytes",
        dest="max_request_bytes",
        help="largest request body, e.g. 64Mi (larger: 413)",
    )
    parser.add_argument(
        "--max-request-rows",
        dest="max_request_rows",
        type=int,
        help="most rows in one request (more: 400 naming the limit)",
    )
    parser.add_argument(
        "--mlflow-timeout",
        dest="mlflow_timeout",
        type=int,
        help="seconds one MLflow HTTP call may take",
    )
    parser.add_argument(
        "--mlflow-retries", dest="mlflow_retries", type=int, help="retries of an MLflow call"
    )
    parser.add_argument(
        "--shutdown-seconds",
        dest="shutdown_seconds",
        type=float,
        help="after SIGTERM, exit within this many seconds",
    )
    parser.add_argument(
        "--access-log",
        dest="access_log",
        action="store_const",
        const=True,
        help="log a line per request (off by default)",
    )
    parser.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_false",
        help="do not download the artifacts at start",
    )
    parser.add_argument(
        "--exit-if-unloadable",
        dest="exit_if_unloadable",
        action="store_const",
        const=True,
        help="exit with status 3 when a pinned model's files download but do not load "
        "(a crash Kubernetes shows; otherwise that model is never ready)",
    )
    parser.add_argument(
        "--termination-log",
        dest="termination_log",
        help="where --exit-if-unloadable writes why (default /dev/termination-log)",
    )


def served_models(pairs: list[str]) -> dict[str, str]:
    """`NAME=URI` arguments as {name: uri}; a malformed or repeated one is a ValueError."""
    models: dict[str, str] = {}
    for pair in pairs:
        name, equals, uri = pair.partition("=")
        if not equals or not name or not uri:
            raise ValueError(f"--serve-model: expected NAME=URI, got {pair!r}")
        if name in models:
            raise ValueError(f"--serve-model: {name!r} is given twice")
        models[name] = uri
    return models


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    fields: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key in ServerSettings.model_fields and value is not None
    }
    if fields.get("protocol") == "grpc-v2":
        fields["protocol"] = "v2"
    if args.serve_model:
        fields["models"] = served_models(args.serve_model)
    if "enable_grpc" in fields:
        fields["enable_grpc"] = fields["enable_grpc"] == "true"
    return ServerSettings(**fields)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m mlkube.model_servers",
        description="Serve MLflow models as a KServe predictor.",
    )
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        # Settings are this command's arguments: reported as argparse reports a bad one.
        parser.error(format_validation_error(error, whole="arguments"))
    except ValueError as error:
        parser.error(str(error))
    from mlkube.model_servers.server import run

    run(settings)
    return 0
