"""The predictor's several-models options: --serve-model NAME=URI and --owner-namespace."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mlkube.model_servers.commands import CommandError, cmd_predict, settings_for_serve
from mlkube.model_servers.entrypoint import main, served_models
from mlkube.model_servers.settings import ServerSettings
from mlkube.model_servers.sources import ModelSource, UnknownModel, owned_by


def test_serve_model_pairs() -> None:
    assert served_models(["a=models:/a/1", "b=models:/b@prod"]) == {
        "a": "models:/a/1",
        "b": "models:/b@prod",
    }
    with pytest.raises(ValueError, match="expected NAME=URI, got 'a'"):
        served_models(["a"])
    with pytest.raises(ValueError, match="'a' is given twice"):
        served_models(["a=models:/a/1", "a=models:/a/2"])


def test_bad_serve_model_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--serve-model", "a"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--serve-model: expected NAME=URI" in err


def test_several_models_are_a_mode_of_their_own() -> None:
    settings = ServerSettings(models={"a": "models:/a/1"}, owner_namespace="team-a")
    assert settings.model_uri is None and not settings.multi_model
    with pytest.raises(ValueError, match="give only one of"):
        ServerSettings(models={"a": "models:/a/1"}, multi_model=True)
    with pytest.raises(ValueError, match="'a b' is not a model name"):
        ServerSettings(models={"a b": "models:/a/1"})


def resolved(uri: str) -> ModelSource:
    return ModelSource(uri, "key", uri.removeprefix("models:/").split("/")[0].split("@")[0])


def test_a_namespace_server_finds_only_its_own_models() -> None:
    owners = {"ours": "team-a", "theirs": "team-b", "untagged": None}

    def owner_of(name: str) -> str | None:
        if name not in owners:
            raise UnknownModel(f"model {name!r} is not in the registry")
        return owners[name]

    resolve = owned_by("team-a", resolved, owner_of)
    assert resolve("models:/ours@champion").name == "ours"
    assert resolve("models:/ours/2").uri == "models:/ours/2"
    answers = []
    for uri in ("models:/theirs@champion", "models:/untagged/1", "models:/absent@champion"):
        with pytest.raises(UnknownModel) as refused:
            resolve(uri)
        answers.append(str(refused.value).replace(uri.split("/")[1].split("@")[0], "X"))
    # another namespace's model looks exactly like one that does not exist
    assert answers == ["model 'X' is not in the registry"] * 3
    for path in ("runs:/abc/model", "/etc/models/x", "s3://bucket/model"):
        with pytest.raises(UnknownModel, match="is not a registered model"):
            resolve(path)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "many-models"


def serve_args(file: Path) -> argparse.Namespace:
    return argparse.Namespace(
        file=str(file), model_uri=None, multi_model=False, host="127.0.0.1", port=9000,
        grpc_port=9001, ttl_seconds=None, memory_budget=None, tracking_uri="sqlite:///x.db",
    )  # fmt: skip


def test_mlkube_serve_of_the_examples() -> None:
    listed = settings_for_serve(serve_args(EXAMPLES / "modeldeployment.yaml"))
    assert listed.models == {
        "insurance": "models:/insurance@champion",
        "wine-quality": "models:/wine-quality@prod",
        "churn": "models:/churn/4",
    }
    assert listed.memory_budget == 2**30 and listed.owner_namespace is None
    anything = settings_for_serve(serve_args(EXAMPLES / "any-model.yaml"))
    assert anything.multi_model and anything.alias == "champion"
    assert anything.memory_budget == 2 * 2**30


def test_mlkube_predict_of_several_models_wants_a_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(
        file=str(EXAMPLES / "modeldeployment.yaml"), model=None, protocol=None, data="{}",
        input=None, explain=False, url="http://127.0.0.1:1", timeout=1.0,
    )  # fmt: skip
    with pytest.raises(CommandError, match="serves several models by name; give --model NAME"):
        cmd_predict(args)
