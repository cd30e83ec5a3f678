"""Settings, URI parsing and the CLI's pure parts (no server, no MLflow)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from mlkube.model_servers.commands import (
    CommandError,
    build_request,
    read_input,
    settings_for_serve,
)
from mlkube.model_servers.settings import ServerSettings, parse_quantity
from mlkube.model_servers.sources import parse_uri

DEPLOYMENT = """\
apiVersion: mlkube.io/v1alpha1
kind: ModelDeployment
metadata: {name: insurance}
spec:
  model: {name: insurance}
  protocol: v2
  ttlSeconds: 42
  limits: {maxRequestBytes: 8Mi, maxRequestRows: 500}
"""


@pytest.mark.parametrize(
    ("text", "size"), [("512Mi", 512 * 2**20), ("1G", 10**9), ("2Gi", 2 * 2**30), ("100", 100)]
)
def test_quantities(text: str, size: int) -> None:
    assert parse_quantity(text) == size


def test_settings_name_the_bad_field() -> None:
    assert ServerSettings(model_uri="models:/ins@champion").model_name == "ins"
    with pytest.raises(ValidationError, match="memory_budget"):
        ServerSettings(model_uri="models:/a/1", memory_budget="lots")
    with pytest.raises(ValidationError, match="model_uri: required"):
        ServerSettings()
    with pytest.raises(ValidationError, match="give only one of --model-uri, --multi-model"):
        ServerSettings(model_uri="models:/a/1", multi_model=True)


def test_uri_parsing() -> None:
    assert parse_uri("models:/ins/3").kind == "version"
    assert parse_uri("models:/ins@champion").ref == "champion"
    assert parse_uri("runs:/abc/model").kind == "run"
    assert parse_uri("/tmp/model").kind == "local"
    with pytest.raises(ValueError, match="version must be a number"):
        parse_uri("models:/ins/latest")


def test_serve_settings_from_a_model_deployment(tmp_path: Path) -> None:
    manifest = tmp_path / "md.yaml"
    manifest.write_text(DEPLOYMENT)
    args = argparse.Namespace(
        file=str(manifest),
        model_uri=None,
        multi_model=False,
        host="127.0.0.1",
        port=9000,
        grpc_port=9001,
        ttl_seconds=None,
        memory_budget="64Mi",
        tracking_uri="sqlite:///x.db",
    )
    settings = settings_for_serve(args)
    assert settings.model_uri == "models:/insurance@champion"
    assert (settings.ttl_seconds, settings.protocol, settings.host) == (42, "v2", "127.0.0.1")
    assert settings.memory_budget == 64 * 2**20
    assert (settings.max_request_bytes, settings.max_request_rows) == (8 * 2**20, 500)


def test_predict_bodies_for_both_protocols(tmp_path: Path) -> None:
    records = [{"age": 30, "bmi": 25.5, "smoker": "no"}]
    assert build_request(records[0], "v1") == {"instances": records}
    v2 = build_request(records, "v2")
    assert [(i["name"], i["datatype"]) for i in v2["inputs"]] == [
        ("age", "INT64"),
        ("bmi", "FP64"),
        ("smoker", "BYTES"),
    ]
    assert build_request([[1, 2], [3, 4]], "v2")["inputs"][0]["shape"] == [2, 2]
    csv = tmp_path / "rows.csv"
    csv.write_text("age,bmi,smoker\n30,25.5,no\n")
    assert read_input(None, str(csv)) == records
    with pytest.raises(CommandError, match="no such file"):
        read_input(None, str(tmp_path / "missing.json"))
    with pytest.raises(CommandError, match="malformed JSON"):
        read_input("{", None)


def test_bad_entrypoint_arguments_are_one_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlkube.model_servers",
            "--model-uri",
            "models:/a/1",
            "--max-request-bytes",
            "lots",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "max_request_bytes" in result.stderr and "Traceback" not in result.stderr


def test_the_server_imports_neither_ray_nor_prefect(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from mlkube.model_servers.server import build\n"
        "from mlkube.model_servers.settings import ServerSettings\n"
        "build(ServerSettings(model_uri='models:/a/1', cache_dir=sys.argv[1]))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'prefect'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_request_logs_are_off_unless_asked_for() -> None:
    from mlkube.model_servers.entrypoint import (
        OneLineParser,
        add_server_arguments,
        settings_from_args,
    )

    parser = OneLineParser()
    add_server_arguments(parser)
    quiet = settings_from_args(parser.parse_args(["--model-uri", "models:/m/1"]))
    loud = settings_from_args(parser.parse_args(["--model-uri", "models:/m/1", "--access-log"]))
    assert (quiet.access_log, loud.access_log) == (False, True)
