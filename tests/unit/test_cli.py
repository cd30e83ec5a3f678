"""`mlkube`'s one path from an error to a line on stderr and an exit code."""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import pytest

from mlkube import cli
from mlkube.api import CommandFailed, ManifestError, UserError
from mlkube.flows.retrain_models import RetrainFailed
from mlkube.model_servers.commands import CommandError, PredictionFailed


def parser_raising(error: BaseException) -> argparse.ArgumentParser:
    def handler(_args: argparse.Namespace) -> int:
        raise error

    parser = argparse.ArgumentParser(prog="test")
    parser.set_defaults(handler=handler)
    return parser


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CommandFailed("it failed"), 1),
        (UserError("it failed"), 2),
        (ManifestError("it failed"), 2),
        (CommandError("it failed"), 2),
        (PredictionFailed("it failed"), 1),
        (RetrainFailed("it failed"), 1),
    ],
)
def test_each_error_is_one_line_and_its_own_exit_code(
    error: CommandFailed, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert type(error).exit_code == code
    assert cli.main([], parser_raising(error)) == code
    assert capsys.readouterr().err == "error: it failed\n"


def test_interrupted(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([], parser_raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_other_exceptions_are_bugs_and_keep_their_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        cli.main([], parser_raising(ZeroDivisionError()))


def test_crds_out_of_date_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds", "--check", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: out of date: ") and err.count("\n") == 1
    assert cli.main(["crds", "-o", str(tmp_path)]) == 0
    assert cli.main(["crds", "--check", "-o", str(tmp_path)]) == 0


def test_a_missing_extra_leaves_its_commands_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> types.ModuleType:
        raise ModuleNotFoundError(f"No module named {'kserve'!r}", name="kserve")

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    sub = argparse.ArgumentParser().add_subparsers()
    cli._add_optional(sub, "mlkube.model_servers.commands", "add_serve_parser")
    assert sub.choices == {}


def test_a_broken_command_module_is_not_hidden() -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    with pytest.raises(ModuleNotFoundError):
        cli._add_optional(sub, "mlkube.model_servers.no_such_module", "add_serve_parser")
    with pytest.raises(AttributeError):
        cli._add_optional(sub, "mlkube.model_servers.commands", "add_sevre_parser")
