"""Finding 7: the promotion gate is not check-then-set. Two gates read the same champion
before either moves the alias (one is held between its read and its write while the other
runs to the end); the better model ends as champion, in both orders. And a champion that
cannot be read from MLflow promotes nothing. Against the real MLflow server, with real
registered scikit-learn models scored on the same held-out data."""

from __future__ import annotations

import contextlib
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlkube.api.registered_model import CHALLENGER_ALIAS
from mlkube.training import registry
from mlkube.training.ownership import TAG_OWNER
from tests.fixtures.mlflow_server import (
    MlflowServer,
    process_wide_uris,
    start_mlflow_server,
    stop_process_group,
)

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
# The held-out data: y = 2x. A model y = slope * x scores MAE |slope - 2| * mean(x), mean(x) 4.5.
X = [float(i) for i in range(10)]
TRUE_SLOPE = 2.0


@dataclass
class LineTask:
    """The one part of a task the gate uses: its metrics of a model on the held-out data."""

    def evaluate(self, model: Any, data: Any) -> dict[str, float]:
        import pandas as pd

        predictions = model.predict(pd.DataFrame({"x": X}))
        errors = [abs(p - TRUE_SLOPE * x) for p, x in zip(predictions, X, strict=True)]
        return {"mae": float(sum(errors)) / len(X)}


@pytest.fixture
def tracking(mlflow_server: MlflowServer) -> Iterator[MlflowClient]:
    """MLflow's process-wide tracking URI on the real server (the gate downloads champions
    through it, as the train flow does), as they were afterwards."""
    with process_wide_uris(mlflow_server.tracking_uri):
        yield MlflowClient(mlflow_server.tracking_uri)


def register_lines(client: MlflowClient, slopes: list[float]) -> str:
    """A model owned by NAMESPACE with one version per slope (v1 = slopes[0], ...)."""
    import mlflow
    import pandas as pd
    from sklearn.linear_model import LinearRegression

    name = f"race-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name, tags={TAG_OWNER: NAMESPACE})
    mlflow.set_experiment(name)
    x = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0]})
    for slope in slopes:
        with mlflow.start_run():
            mlflow.sklearn.log_model(
                LinearRegression().fit(x, x["x"] * slope), name="model",
                input_example=x.head(2), pip_requirements=["scikit-learn"],
                registered_model_name=name,
            )  # fmt: skip
    return name


def gate(client: MlflowClient, tracking_uri: str, name: str, version: int,
         hold: Any = lambda: None) -> registry.GateResult:  # fmt: skip
    """One train flow's gate for `version`: read the champion and score both on the same
    data (the read), then registry.promote (the write), with `hold` in between."""
    task = LineTask()

    def score(champion: int) -> dict[str, float]:
        return registry.score_version(task, None, name, champion)  # type: ignore[arg-type]

    current = registry.version_by_alias(client, name, "champion")
    evaluation = registry.champion_evaluation("mae", score(version), current, score)
    return registry.promote(
        client, tracking_uri, evaluation, lambda e: registry.decide(e, "min", 0.0, True), score,
        name=name, version=version, alias="champion", namespace=NAMESPACE, shared=False,
        hold=hold,
    )  # fmt: skip


@pytest.mark.parametrize("held", ["better", "worse"])
def test_two_gates_that_read_the_same_champion_end_with_the_better_model(
    tracking: MlflowClient, mlflow_server: MlflowServer, held: str
) -> None:
    # v1 champion MAE 4.5; v2 MAE 0.45 (better); v3 MAE 2.25 (worse): both beat v1.
    name = register_lines(tracking, [3.0, 2.1, 2.5])
    tracking.set_registered_model_alias(name, "champion", "1")
    better, worse = 2, 3
    first, second = (better, worse) if held == "better" else (worse, better)

    has_read, release = threading.Event(), threading.Event()
    results: dict[int, Any] = {}

    def hold() -> None:
        has_read.set()  # the first gate has read champion v1 and decided against it
        assert release.wait(120)

    def run_first() -> None:
        try:
            results[first] = gate(tracking, mlflow_server.tracking_uri, name, first, hold)
        except BaseException as error:  # surfaced below
            results[first] = error
            has_read.set()

    thread = threading.Thread(target=run_first)
    thread.start()
    assert has_read.wait(120)
    # The second gate reads the same champion (v1: the first has not written) and runs to
    # the end: it moves the alias while the first is held between its read and its write.
    assert registry.version_by_alias(tracking, name, "champion") == 1
    results[second] = gate(tracking, mlflow_server.tracking_uri, name, second)
    release.set()
    thread.join(120)
    assert not isinstance(results[first], BaseException), results[first]

    assert tracking.get_model_version_by_alias(name, "champion").version == str(better)
    assert results[better].alias == "champion" and results[better].decision.promote
    if held == "worse":
        # It read v1, but decided against v2, which had become champion meanwhile.
        assert results[worse].alias == CHALLENGER_ALIAS
        assert not results[worse].decision.promote
        assert results[worse].evaluation.champion_version == better
        assert "champion moved to v2" in results[worse].decision.reason
    else:
        # The worse one beat v1 and was champion until the better one, which had read v1
        # too, decided again against it and won.
        assert results[worse].alias == "champion"
        assert results[better].evaluation.champion_version == worse
        assert results[better].decision.reason.startswith("better: mae 0.45 vs champion v3 2.25")
    # The description of each version says the final reason.
    for version, result in results.items():
        described = tracking.get_model_version(name, str(version)).description
        assert described == result.decision.reason


def test_a_champion_whose_files_are_gone_promotes_nothing(
    tracking: MlflowClient, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion's files are gone from the server: the new version, however bad (MAE
    about 4.5e9), becomes challenger and the reason says why."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    name = register_lines(tracking, [3.0, 1e9])
    tracking.set_registered_model_alias(name, "champion", "1")
    champion = tracking.get_model_version(name, "1")
    model_id = champion.source.rstrip("/").rsplit("/", 1)[-1]
    removed = [p for p in mlflow_server.artifacts.rglob(model_id) if p.is_dir()]
    assert removed, f"no artifact folder for {model_id} under {mlflow_server.artifacts}"
    for folder in removed:
        shutil.rmtree(folder)

    result = gate(tracking, mlflow_server.tracking_uri, name, 2)
    assert result.alias == CHALLENGER_ALIAS and not result.decision.promote
    assert result.decision.reason.startswith("champion v1 could not be read from MLflow")
    assert "no MLmodel" in result.decision.reason
    assert tracking.get_model_version_by_alias(name, "champion").version == "1"
    assert tracking.get_model_version_by_alias(name, "challenger").version == "2"


def test_a_champion_that_cannot_be_fetched_for_a_connection_error_promotes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow goes away between the new model's scoring and the champion's: the terrible
    new model is not promoted, and the reason names the connection error."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = start_mlflow_server(tmp_path / "mlflow")
    try:
        stack = contextlib.ExitStack()
        stack.enter_context(process_wide_uris(server.tracking_uri))
        client = MlflowClient(server.tracking_uri)
        name = register_lines(client, [3.0, 1e9])
        client.set_registered_model_alias(name, "champion", "1")
        task = LineTask()

        def score(version: int) -> dict[str, float]:
            return registry.score_version(task, None, name, version)  # type: ignore[arg-type]

        new = score(2)
        stop_process_group(server.process)
        evaluation = registry.champion_evaluation("mae", new, 1, score)
    finally:
        stop_process_group(server.process)
        stack.close()
    assert new == {"mae": pytest.approx(abs(1e9 - 2.0) * 4.5)}  # v2, read from this server
    assert evaluation.champion_unreadable
    decision = registry.decide(evaluation, "min", 0.0, True)
    assert not decision.promote
    assert decision.reason.startswith("champion v1 could not be read from MLflow to score it (")
    assert "Connection" in decision.reason or "connect" in decision.reason, decision.reason
