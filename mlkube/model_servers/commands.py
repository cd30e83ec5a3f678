"""`mlkube serve` and `mlkube predict`: the local face of the predictor.

Wired into mlkube/cli.py with `add_serve_parser(subparsers)` and `add_predict_parser(subparsers)`;
each sets `handler(args) -> int`, which raises mlkube.api.CommandFailed for cli.main to report.
Importing this module is cheap (no kserve, no mlflow).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mlkube.api import CommandFailed, UserError
from mlkube.api.common import MlflowSettings
from mlkube.local import local_tracking_uri
from mlkube.model_servers.settings import ServerSettings

LOCAL_HOST = "127.0.0.1"


class CommandError(UserError):
    """A problem with the user's input (exit 2)."""


class PredictionFailed(CommandFailed):
    """The server could not be reached, or refused the request (exit 1)."""


# -- serve ---------------------------------------------------------------------------------
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve a ModelDeployment's model on this machine (KServe predictor, loopback)",
        description="Runs the same predictor as the cluster, against the local MLflow, "
        "listening on 127.0.0.1. Ctrl-C stops it.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-f", "--file", help="ModelDeployment YAML")
    source.add_argument("--model-uri", help="models:/name/version, models:/name@alias, runs:/...")
    source.add_argument("--multi-model", action="store_true", help="serve any model by name")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument("--grpc-port", type=int, default=8081, help="gRPC port (default 8081)")
    parser.add_argument("--host", default=LOCAL_HOST, help="listen address (default 127.0.0.1)")
    parser.add_argument("--ttl-seconds", type=float, help="override spec.ttlSeconds")
    parser.add_argument("--memory-budget", help="e.g. 512Mi: evict least recently used beyond it")
    parser.add_argument("--tracking-uri", help="override the MLflow tracking URI")
    parser.set_defaults(handler=cmd_serve)
    return parser


def settings_for_serve(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from `mlkube serve` arguments (and the ModelDeployment file, if any)."""
    fields: dict[str, Any] = {
        "host": args.host,
        "http_port": args.port,
        "grpc_port": args.grpc_port,
    }
    mlflow = MlflowSettings()  # without a ModelDeployment: local mode's MLflow
    if args.file:
        from mlkube.api import ModelDeployment, load_manifest
        from mlkube.api.registered_model import model_uri

        deployment = load_manifest(args.file, ModelDeployment)  # ManifestError: one line
        spec = deployment.spec
        # Locally every model is the user's own: no owner namespace is checked.
        uris = {
            selector.name: model_uri(
                selector.name, version=selector.version, alias=selector.followed_alias
            )
            for selector in spec.selectors
        }
        if spec.model is not None:
            fields |= {"model_uri": uris[spec.model.name], "model_name": spec.model.name}
        elif spec.models is not None:
            fields["models"] = uris
        elif spec.any_model is not None:
            fields |= {"multi_model": True, "alias": spec.any_model.alias}
        fields |= {"ttl_seconds": spec.ttl_seconds, "protocol": spec.protocol}
        if spec.memory_budget is not None:
            fields["memory_budget"] = spec.memory_budget
        limits = spec.limits.model_dump(exclude_none=True)  # unset: the server's defaults
        fields |= limits
        mlflow = spec.mlflow
    elif args.model_uri:
        fields["model_uri"] = args.model_uri
    else:
        fields["multi_model"] = True
    if args.ttl_seconds is not None:
        fields["ttl_seconds"] = args.ttl_seconds
    if args.memory_budget:
        fields["memory_budget"] = args.memory_budget
    fields["tracking_uri"] = args.tracking_uri or mlflow.tracking_uri_or(local_tracking_uri())
    try:
        return ServerSettings(**fields)
    except ValidationError as error:
        from mlkube.api.manifest import format_validation_error

        raise CommandError(format_validation_error(error, whole="arguments")) from None


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise CommandError(
                f"port {port} on {host} is in use; choose another with --port"
            ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_for_serve(args)
    check_port_free(settings.host, settings.http_port)
    if settings.enable_grpc:
        check_port_free(settings.host, settings.grpc_port)
    from mlkube.model_servers.server import run

    print(
        f"serving {settings.model_uri or ', '.join(settings.models) or 'registered models'} as "
        f"{settings.model_name or '<name>'} on http://{settings.host}:{settings.http_port} "
        f"(gRPC {settings.grpc_port}); MLflow at {settings.tracking_uri}",
        file=sys.stderr,
    )
    run(settings)
    return 0


# -- predict -------------------------------------------------------------------------------
def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "predict",
        help="send one request to a model server and print the answer",
        description="Input: a request body, a record, records or rows, as inline JSON or a "
        ".json/.csv file. The body is built for the protocol (v1 instances or v2 inputs).",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-f", "--file", help="ModelDeployment YAML (model name and protocol)")
    target.add_argument("--model", help="model name on the server")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("-d", "--data", help="inline JSON")
    data.add_argument("-i", "--input", help="a .json or .csv file")
    parser.add_argument("--url", default=f"http://{LOCAL_HOST}:8080", help="server base URL")
    parser.add_argument("--protocol", choices=["v1", "v2"], help="default: the file's, else v1")
    parser.add_argument("--explain", action="store_true", help="v1 :explain instead of predict")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.set_defaults(handler=cmd_predict)
    return parser


def read_input(inline: str | None, path: str | None) -> Any:
    """The user's data: parsed JSON, or CSV rows as records."""
    if inline is not None:
        try:
            return json.loads(inline)
        except json.JSONDecodeError as error:
            raise CommandError(f"--data: malformed JSON: {error}") from None
    assert path is not None
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{path}: no such file")
    if file.suffix.lower() == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(file)
        except (ValueError, pd.errors.ParserError) as error:
            raise CommandError(f"{path}: not a CSV table: {str(error).splitlines()[0]}") from None
        return json.loads(frame.to_json(orient="records"))
    try:
        return json.loads(file.read_text())
    except ValueError as error:  # not JSON, or not UTF-8 text
        raise CommandError(f"{path}: malformed JSON: {error}") from None


def _v2_datatype(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "BOOL"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "INT64"
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "FP64"
    return "BYTES"


def build_request(data: Any, protocol: str) -> dict[str, Any]:
    """A request body for `protocol` from a body, a record, records or rows."""
    if isinstance(data, dict) and ("instances" in data or "inputs" in data):
        if (
            protocol == "v1"
            or isinstance(data.get("inputs"), list)
            and all(isinstance(i, dict) and "datatype" in i for i in data["inputs"])
        ):
            return data
        data = data.get("instances", data.get("inputs"))
    rows = [data] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise CommandError("input: expected a record, a list of records or rows, or a body")
    if protocol == "v1":
        return {"instances": rows}
    if all(isinstance(r, dict) for r in rows):
        names = list(dict.fromkeys(k for r in rows for k in r))
        inputs = []
        for name in names:
            values = [r.get(name) for r in rows]
            inputs.append(
                {
                    "name": name,
                    "shape": [len(values)],
                    "datatype": _v2_datatype(values),
                    "data": values,
                }
            )
        return {"inputs": inputs}
    import numpy as np

    try:
        array = np.asarray(rows, dtype=float)
    except ValueError:
        raise CommandError("input: rows must be a rectangular array of numbers for v2") from None
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": list(array.shape),
                "datatype": "FP64",
                "data": array.reshape(-1).tolist(),
            }
        ]
    }


def cmd_predict(args: argparse.Namespace) -> int:
    name, protocol = args.model, args.protocol
    if args.file:
        from mlkube.api import ModelDeployment, load_manifest

        deployment = load_manifest(args.file, ModelDeployment)
        if deployment.spec.model is None:
            raise CommandError(
                f"{args.file}: serves several models by name; give --model NAME instead of -f"
            )
        name = deployment.spec.model.name
        protocol = protocol or deployment.spec.protocol
    protocol = protocol or "v1"
    if args.explain and protocol != "v1":
        raise CommandError("--explain: explanations use the v1 protocol (add --protocol v1)")
    body = build_request(read_input(args.data, args.input), protocol)
    base = args.url.rstrip("/")
    if protocol == "v2":
        url = f"{base}/v2/models/{name}/infer"
    else:
        url = f"{base}/v1/models/{name}:{'explain' if args.explain else 'predict'}"
    import httpx

    try:
        response = httpx.post(url, json=body, timeout=args.timeout)
    except httpx.HTTPError as error:
        raise PredictionFailed(
            f"cannot reach {url}: {error} (is `mlkube serve` running?)"
        ) from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": response.text.strip()[:500]}
    if response.status_code >= 400:
        message = answer.get("error") or answer.get("detail") if isinstance(answer, dict) else None
        raise PredictionFailed(f"HTTP {response.status_code}: {message or answer}")
    print(json.dumps(answer, indent=2))
    return 0
