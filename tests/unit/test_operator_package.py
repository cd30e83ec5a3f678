"""The operator's import footprint and its CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlkube.operator.commands import add_operator_parser

REPO = Path(__file__).resolve().parents[2]


def test_operator_never_imports_ray_torch_or_prefect() -> None:
    # In a fresh interpreter: this test session may have imported them already.
    code = (
        "import sys, mlkube.operator.handlers, mlkube.operator.__main__, mlkube.operator.commands\n"
        "import mlkube.operator.process\n"
        "heavy = ('ray', 'torch', 'prefect', 'mlflow', 'pandas')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == ""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlkube")
    add_operator_parser(parser.add_subparsers())
    return parser.parse_args(["operator", *argv])


def test_cli_run_arguments() -> None:
    args = parse("run", "-n", "a", "-n", "b", "--log-format", "plain")
    assert args.namespaces == ["a", "b"] and not args.all_namespaces
    assert args.handler.__name__ == "run_command"
    assert parse("run", "-A").all_namespaces


def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "both.yaml"
    manifest.write_text(
        "apiVersion: mlkube.io/v1alpha1\nkind: TrainingRun\nmetadata: {name: tr}\n"
        "spec: {task: insurance, model: {name: ins}}\n---\n"
        "apiVersion: mlkube.io/v1alpha1\nkind: ModelDeployment\nmetadata: {name: md}\n"
        "spec: {model: {name: ins}}\n"
    )
    args = parse("render", "-f", str(manifest), "--model-version", "4")
    assert args.handler(args) == 0
    rayjob, isvc = yaml.safe_load_all(capsys.readouterr().out)
    assert rayjob["kind"] == "RayJob" and isvc["kind"] == "InferenceService"
    assert "models:/ins/4" in isvc["spec"]["predictor"]["containers"][0]["args"]
    args = parse("render", "-f", str(manifest))
    assert args.handler(args) == 2
    assert "give --model-version" in capsys.readouterr().err
