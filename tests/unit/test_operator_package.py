"""The operator's import footprint and its CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlkube.cli import main as cli_main
from mlkube.operator.commands import add_operator_parser, module_argv

REPO = Path(__file__).resolve().parents[2]
HEAVY = "('ray', 'torch', 'prefect', 'mlflow', 'pandas')"


def test_operator_never_imports_ray_torch_or_prefect() -> None:
    # In a fresh interpreter: this test session may have imported them already.
    code = (
        "import sys, mlkube.operator.handlers, mlkube.operator.__main__, mlkube.operator.commands\n"
        "import mlkube.operator.process\n"
        f"print(','.join(sorted(m for m in {HEAVY} if m in sys.modules)))\n"
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == ""


def test_the_operator_entry_point_builds_its_command_line_without_them() -> None:
    """`python -m mlkube.operator` goes through mlkube.cli, which imports the training
    commands only when they run; pyproject.toml's operator-image contract relies on this."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['mlkube.operator', '--help']\n"
        "try:\n"
        "    runpy.run_module('mlkube.operator', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(','.join(sorted(m for m in {HEAVY} if m in sys.modules)), file=sys.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "usage: mlkube operator" in out.stdout
    assert out.stderr.strip() == ""


def test_module_arguments_default_to_run() -> None:
    assert module_argv([]) == ["operator", "run"]
    assert module_argv(["-n", "a"]) == ["operator", "run", "-n", "a"]
    assert module_argv(["render", "-f", "x"]) == ["operator", "render", "-f", "x"]
    assert module_argv(["--help"]) == ["operator", "--help"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlkube")
    add_operator_parser(parser.add_subparsers())
    return parser.parse_args(["operator", *argv])


def test_cli_run_arguments() -> None:
    """What `run` does with them: tests/e2e/test_operator.py runs the command."""
    args = parse("run", "-n", "a", "-n", "b", "--log-format", "plain")
    assert args.namespaces == ["a", "b"] and not args.all_namespaces
    assert parse("run", "-A").all_namespaces


def test_cli_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "both.yaml"
    manifest.write_text(
        "apiVersion: mlkube.io/v1alpha1\nkind: TrainingRun\nmetadata: {name: tr}\n"
        "spec: {task: insurance, model: {name: ins}}\n---\n"
        "apiVersion: mlkube.io/v1alpha1\nkind: ModelDeployment\nmetadata: {name: md}\n"
        "spec: {model: {name: ins}}\n"
    )
    assert cli_main(["operator", "render", "-f", str(manifest), "--model-version", "4"]) == 0
    rayjob, isvc = yaml.safe_load_all(capsys.readouterr().out)
    assert rayjob["kind"] == "RayJob" and isvc["kind"] == "InferenceService"
    assert "models:/ins/4" in isvc["spec"]["predictor"]["containers"][0]["args"]
    assert cli_main(["operator", "render", "-f", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {manifest}: md follows an alias; give --model-version\n"
    assert cli_main(["operator", "render", "-f", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.yaml'}: no such file\n"


def test_render_shows_what_the_operator_with_its_settings_would_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlkube.operator.settings import get_settings

    manifest = tmp_path / "both.yaml"
    manifest.write_text(
        "apiVersion: mlkube.io/v1alpha1\nkind: TrainingRun\nmetadata: {name: tr}\n"
        "spec: {task: insurance, model: {name: ins}}\n---\n"
        "apiVersion: mlkube.io/v1alpha1\nkind: ModelDeployment\nmetadata: {name: md}\n"
        "spec: {model: {name: ins, version: 2}, canary: {trafficPercent: 10}}\n"
    )
    monkeypatch.setenv("MLKUBE_OPERATOR_MLFLOW_CREDENTIALS_SECRET", "team-mlflow")
    monkeypatch.setenv("MLKUBE_OPERATOR_PREDICTOR_IMAGE", "registry.local/predictor:9")
    monkeypatch.setenv("MLKUBE_OPERATOR_ALLOW_SHARED_MODELS", "true")
    get_settings.cache_clear()
    try:
        assert cli_main(["operator", "render", "-f", str(manifest)]) == 0
    finally:
        get_settings.cache_clear()
    rayjob, isvc = yaml.safe_load_all(capsys.readouterr().out)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    predictor = isvc["spec"]["predictor"]
    for container in (head, predictor["containers"][0]):
        env = container["env"]
        secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
        assert secrets == {"team-mlflow"}
    assert rayjob["spec"]["entrypoint"].endswith("--allow-shared-models")
    assert predictor["containers"][0]["image"] == "registry.local/predictor:9"
    assert predictor["canaryTrafficPercent"] == 10
