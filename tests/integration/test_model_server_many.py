"""Several models in one real predictor process, against a real `mlflow server`.

D serves three listed models (`--serve-model`, as the operator pins spec.models) of
namespace team-a under a memory budget of 1.5 forests: each model has its own readiness and
metrics, and the budget evicts the least recently used first. E serves any model of
team-a by name (`--multi-model --owner-namespace`, as for spec.anyModel): team-b's model
gets the same 404 as a model that does not exist. Nothing is mocked; nothing timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest

from mlkube.training.ownership import TAG_OWNER
from tests.fixtures.mlflow_server import MlflowServer
from tests.integration.test_model_server import (
    ROWS,
    ModelServerProcess,
    _log_forest,
    _log_sklearn,
    _poll,
    _start,
    serving,
)

pytestmark = pytest.mark.integration

LINEAR, FOREST_A, FOREST_B, FOREIGN = "many-linear", "many-forest-a", "many-forest-b", "many-b"
LINEAR_ROW = {"instances": ROWS[:1]}
FOREST_ROW = {"instances": [{f"x{i}": 0.5 for i in range(5)}]}


@pytest.fixture(scope="module")
def forest_bytes(mlflow_server: MlflowServer) -> int:
    """Registers the models (owner tags as mlkube's train flow sets them); returns the
    tree arrays' bytes of one forest."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    client = mlflow.MlflowClient()
    sizes = {}
    for name, log, owner in (
        (LINEAR, _log_sklearn, "team-a"),
        (FOREST_A, partial(_log_forest, seed=3), "team-a"),
        (FOREST_B, partial(_log_forest, seed=4), "team-a"),
        (FOREIGN, _log_sklearn, "team-b"),
    ):
        sizes[name] = log(name)
        client.set_registered_model_tag(name, TAG_OWNER, owner)
        client.set_registered_model_alias(name, "champion", "1")
    return int(sizes[FOREST_A])


@pytest.fixture(scope="module")
def servers(
    mlflow_server: MlflowServer, forest_bytes: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ModelServerProcess]]:
    root = tmp_path_factory.mktemp("many-models")
    uri = mlflow_server.tracking_uri
    listed = [
        arg
        for name in (LINEAR, FOREST_A, FOREST_B)
        for arg in ("--serve-model", f"{name}=models:/{name}/1")
    ]
    started = {
        "D": _start(root / "D", uri, *listed, "--owner-namespace", "team-a",
                    "--ttl-seconds", "600", "--memory-budget", str(int(forest_bytes * 1.5))),
        "E": _start(root / "E", uri, "--multi-model", "--owner-namespace", "team-a",
                    "--ttl-seconds", "600"),
    }  # fmt: skip
    with serving(started):
        yield started


def ready(server: ModelServerProcess, path: str) -> bool:
    return server.get(path).status_code == 200


def test_each_listed_model_has_its_own_readiness(servers: dict[str, ModelServerProcess]) -> None:
    d = servers["D"]
    _poll(lambda: ready(d, "/v2/health/ready"))
    for name in (LINEAR, FOREST_A, FOREST_B):
        assert ready(d, f"/v2/models/{name}/ready"), name
    assert d.get(f"/v2/models/{FOREIGN}/ready").status_code == 404  # not listed
    unlisted = d.post(f"/v1/models/{FOREIGN}:predict", LINEAR_ROW)
    assert unlisted.status_code == 404


def test_listed_models_share_the_budget_least_recently_used_first(
    servers: dict[str, ModelServerProcess], forest_bytes: int
) -> None:
    d = servers["D"]
    _poll(lambda: ready(d, "/v2/health/ready"))
    assert d.post(f"/v1/models/{LINEAR}:predict", LINEAR_ROW).is_success
    assert d.post(f"/v1/models/{FOREST_A}:predict", FOREST_ROW).is_success
    assert d.metric("mlkube_model_cache_bytes", model=FOREST_A) >= 0.9 * forest_bytes
    assert 0 < d.metric("mlkube_model_cache_bytes", model=LINEAR) < forest_bytes / 10
    assert d.post(f"/v1/models/{FOREST_B}:predict", FOREST_ROW).is_success
    evictions = {
        name: d.metric("mlkube_model_cache_evictions_total", model=name, reason="memory")
        for name in (LINEAR, FOREST_A, FOREST_B)
    }
    assert evictions == {LINEAR: 1, FOREST_A: 1, FOREST_B: 0}
    assert d.metric("mlkube_model_cache_bytes", model=FOREST_B) >= 0.9 * forest_bytes
    # per-model metrics: one load of each, counted under its own name
    for name in (LINEAR, FOREST_A, FOREST_B):
        assert d.metric("mlkube_model_loads_total", model=name, outcome="success") == 1
    # an evicted model serves again (from the disk cache, no new download)
    assert d.post(f"/v1/models/{LINEAR}:predict", LINEAR_ROW).is_success
    assert d.metric("mlkube_model_loads_total", model=LINEAR, outcome="success") == 2
    assert d.metric("mlkube_artifact_downloads_total", model=LINEAR) == 1


def test_any_model_of_the_namespace_and_none_of_another(
    servers: dict[str, ModelServerProcess],
) -> None:
    e = servers["E"]
    assert e.post(f"/v1/models/{LINEAR}:predict", LINEAR_ROW).is_success
    _poll(lambda: ready(e, f"/v2/models/{LINEAR}/ready"))  # after its trial load
    foreign = e.post(f"/v1/models/{FOREIGN}:predict", LINEAR_ROW)
    absent = e.post("/v1/models/many-absent:predict", LINEAR_ROW)
    assert foreign.status_code == absent.status_code == 404
    assert foreign.json()["error"].replace(FOREIGN, "X") == absent.json()["error"].replace(
        "many-absent", "X"
    )
    assert e.get(f"/v2/models/{FOREIGN}/ready").status_code == 404
    assert e.metric("mlkube_model_loads_total", model=FOREIGN, outcome="success") == 0
