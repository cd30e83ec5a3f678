"""The predictor against a real `mlflow server` and real ModelServer subprocesses on loopback.

Three servers share one module: A serves one scikit-learn model with a small TTL (life
cycle, protocols, bad input), B serves any registered model by name (torch, explainer,
a broken model), C serves by name under a small memory budget (LRU). Nothing is mocked;
nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.fixtures.mlflow_server import (
    QUIET_ENV,
    MlflowServer,
    free_port,
    stop_process_group,
    tail,
    wait_http_ok,
)

pytestmark = pytest.mark.integration

TTL_A = 3  # seconds; small so eviction happens within the test
INSURANCE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "insurance.csv"
ROWS = [
    {"age": 19, "sex": "female", "bmi": 27.9, "children": 0, "smoker": "yes", "region": "sw"},
    {"age": 45, "sex": "male", "bmi": 31.123456789, "children": 2, "smoker": "no", "region": "ne"},
    {
        "age": 62,
        "sex": "female",
        "bmi": 22.987654321,
        "children": 1,
        "smoker": "no",
        "region": "se",
    },
]
COLUMNS = list(ROWS[0])


# -- models -------------------------------------------------------------------------------
@dataclass
class Models:
    tracking_uri: str
    sklearn_name: str = "ins-sk"
    torch_name: str = "tnet"
    explainable_name: str = "explainable"
    broken_name: str = "broken"
    # C: a linear model (kilobytes in memory) and two random forests (megabytes)
    small_name: str = "lru-linear"
    forest_names: tuple[str, str] = ("lru-forest-a", "lru-forest-b")
    forest_bytes: int = 0  # the node and value arrays of one forest: a floor of its memory


def _insurance_frame() -> pd.DataFrame:
    if INSURANCE.exists():
        frame = pd.read_csv(INSURANCE)
        return frame.rename(columns={"charges": "expenses"})
    rng = np.random.default_rng(0)  # the shared data is missing: a synthetic stand-in
    frame = pd.DataFrame(ROWS * 20)
    frame["bmi"] = frame["bmi"] + rng.normal(0, 3, len(frame))
    frame["expenses"] = frame["age"] * 250 + frame["bmi"] * 30 + rng.normal(0, 100, len(frame))
    return frame


def _log_sklearn(name: str) -> None:
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    frame = _insurance_frame()
    features = frame[COLUMNS]
    pipeline = make_pipeline(
        make_column_transformer(
            (OneHotEncoder(handle_unknown="ignore"), ["sex", "smoker", "region"]),
            remainder="passthrough",
        ),
        LinearRegression(),
    ).fit(features, frame["expenses"])
    _register_sklearn(pipeline, name, features.head(3))


def _register_sklearn(model: Any, name: str, example: pd.DataFrame, *trusted: str) -> None:
    """Log a scikit-learn model (skops format; `trusted`: the types skops must be told of)
    and register it as `name`."""
    import mlflow

    with mlflow.start_run():
        mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=example,
            pip_requirements=["scikit-learn", "skops"],
            skops_trusted_types=list(trusted) or None,
            registered_model_name=name,
        )


def _log_forest(name: str, seed: int) -> int:
    """A random forest on 5 numeric features, about 14 MiB of tree arrays; returns their
    bytes (what the model must at least hold in memory)."""
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(seed)
    features = pd.DataFrame(rng.random((10_000, 5)), columns=[f"x{i}" for i in range(5)])
    target = rng.random(10_000)
    forest = RandomForestRegressor(n_estimators=15, random_state=seed, n_jobs=1)
    forest.fit(features, target)
    states = [tree.tree_.__getstate__() for tree in forest.estimators_]
    arrays = sum(state["nodes"].nbytes + state["values"].nbytes for state in states)
    _register_sklearn(forest, name, features.head(3), "sklearn.tree._tree.Tree")
    return int(arrays)


def _log_torch(name: str, net: Any = None, example: np.ndarray | None = None) -> None:
    """`net` (by default a small MLP on 4 features) with `example` as its input example (a
    batch of 2 or more: the exported batch size stays dynamic)."""
    import mlflow
    import torch

    if net is None:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        example = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            net,
            name="model",
            input_example=example,
            pip_requirements=["torch"],
            registered_model_name=name,
        )


EXPLAINABLE_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class SumModel(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input.sum(axis=1).to_numpy()

    def explain(self, model_input):
        # the contract: each column's contribution, one dict per row
        return model_input.to_dict(orient="records")


mlflow.models.set_model(SumModel())
"""


def _log_explainable(name: str, where: Path) -> None:
    """A pyfunc (models from code) whose python model has `explain(model_input)`."""
    import mlflow

    code = where / "sum_model.py"
    code.write_text(EXPLAINABLE_CODE)
    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            input_example=pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}),
            pip_requirements=["mlflow"],
            registered_model_name=name,
        )


def _break_latest(server: MlflowServer, name: str) -> None:
    """Delete the artifacts of the latest version of `name` on the server's disk."""
    import mlflow

    version = mlflow.MlflowClient().get_model_version(name, "1")
    model_id = version.model_id or version.source.rsplit("/", 1)[-1]
    doomed = [p.parent for p in server.artifacts.rglob("MLmodel") if model_id in str(p)]
    assert doomed, f"no artifacts of {name} ({model_id}) under {server.artifacts}"
    for path in doomed:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def models(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Models:
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    found = Models(mlflow_server.tracking_uri)
    client = mlflow.MlflowClient()
    for name, log in (
        (found.sklearn_name, _log_sklearn),
        (found.torch_name, _log_torch),
        (found.explainable_name, partial(_log_explainable, where=tmp_path_factory.mktemp("code"))),
        (found.broken_name, _log_sklearn),
        (found.small_name, _log_sklearn),
        (found.forest_names[0], partial(_log_forest, seed=1)),
        (found.forest_names[1], partial(_log_forest, seed=2)),
    ):
        logged = log(name)
        if name == found.forest_names[0]:
            found.forest_bytes = logged
        client.set_registered_model_alias(name, "champion", "1")
    _break_latest(mlflow_server, found.broken_name)
    return found


# -- servers ------------------------------------------------------------------------------
@dataclass
class ModelServerProcess:
    url: str
    grpc_port: int
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def tmpdir(self) -> Path:
        return self.root / "tmp"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60)

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kwargs)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        found = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return found

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def alive(self) -> bool:
        return self.process.poll() is None and self.get("/").status_code == 200


def _start(root: Path, tracking_uri: str, *args: str) -> ModelServerProcess:
    root.mkdir(parents=True)
    (root / "tmp").mkdir()
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        **QUIET_ENV,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLKUBE_HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),  # nothing may be left here
    }
    command = [
        sys.executable, "-m", "mlkube.model_servers",
        "--host", "127.0.0.1",
        "--http_port", str(http_port),
        "--grpc_port", str(grpc_port),
        *args,
    ]  # fmt: skip
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return ModelServerProcess(f"http://127.0.0.1:{http_port}", grpc_port, process, root)


@contextlib.contextmanager
def serving(started: dict[str, ModelServerProcess]) -> Iterator[None]:
    """Servers started together, waited for in turn, and stopped whatever happens."""
    try:
        for server in started.values():
            try:
                wait_http_ok(server.url + "/", 120, server.process)
            except Exception as error:
                raise RuntimeError(f"{error}\n{tail(server.root / 'server.log')}") from None
        yield
    finally:
        for server in started.values():
            stop_process_group(server.process)


@pytest.fixture(scope="module")
def servers(
    models: Models, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ModelServerProcess]]:
    root = tmp_path_factory.mktemp("model-servers")
    started = {
        "A": _start(root / "A", models.tracking_uri,
                    "--model-uri", f"models:/{models.sklearn_name}@champion",
                    "--ttl-seconds", str(TTL_A)),
        "B": _start(root / "B", models.tracking_uri, "--multi-model", "--ttl-seconds", "600"),
        "C": _start(root / "C", models.tracking_uri, "--multi-model", "--ttl-seconds", "600",
                    "--memory-budget", str(int(models.forest_bytes * 1.5))),
    }  # fmt: skip
    with serving(started):
        yield started


def _direct_model(name: str, where: Path) -> Any:
    import mlflow

    path = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(where))
    return mlflow.pyfunc.load_model(path)


def _direct(models: Models, name: str, model_input: Any, where: Path) -> np.ndarray:
    return np.asarray(_direct_model(name, where).predict(model_input))


def _poll(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def _v2_columns(rows: list[dict[str, Any]], float_type: str = "FP32") -> dict[str, Any]:
    """v2 inputs one per column; numbers declared FP32 on purpose (the server must not use it)."""
    inputs = []
    for column in COLUMNS:
        values = [row[column] for row in rows]
        datatype = "BYTES" if isinstance(values[0], str) else float_type
        inputs.append(
            {"name": column, "shape": [len(values)], "datatype": datatype, "data": values}
        )
    return {"inputs": inputs}


def _grpc_infer(port: int, name: str, inputs: list[tuple[str, str, np.ndarray]]) -> Any:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def call() -> Any:
        client = InferenceGRPCClient(url=f"127.0.0.1:{port}", timeout=120)
        try:
            infer_inputs = []
            for input_name, datatype, array in inputs:
                infer_input = InferInput(input_name, list(array.shape), datatype)
                infer_input.set_data_from_numpy(array, binary_data=False)
                infer_inputs.append(infer_input)
            return await client.infer(InferRequest(model_name=name, infer_inputs=infer_inputs))
        finally:
            await client.close()

    return asyncio.run(call())


# -- A: one model, life cycle -------------------------------------------------------------
def test_first_request_loads_then_hits_evicts_and_reloads_from_disk(
    servers: dict[str, ModelServerProcess], models: Models
) -> None:
    a, name = servers["A"], models.sklearn_name
    assert a.metric("mlkube_model_loads_total", model=name, outcome="success") == 0
    body = {"instances": ROWS[:1]}

    assert a.post(f"/v1/models/{name}:predict", body).status_code == 200
    assert a.metric("mlkube_model_loads_total", model=name, outcome="success") == 1
    hits = a.metric("mlkube_model_cache_hits_total", model=name)
    for _ in range(3):
        assert a.post(f"/v1/models/{name}:predict", body).status_code == 200
    assert a.metric("mlkube_model_cache_hits_total", model=name) > hits

    _poll(lambda: a.metric("mlkube_model_cache_evictions_total", model=name, reason="ttl") >= 1)
    assert a.metric("mlkube_model_cache_bytes", model=name) == 0
    assert a.post(f"/v1/models/{name}:predict", body).status_code == 200
    assert a.metric("mlkube_model_loads_total", model=name, outcome="success") >= 2
    assert a.metric("mlkube_artifact_downloads_total", model=name) == 1  # reload read the disk
    assert a.metric("mlkube_artifact_cache_hits_total", model=name) >= 1


def test_twenty_concurrent_first_requests_cause_one_load(
    servers: dict[str, ModelServerProcess], models: Models
) -> None:
    a, name = servers["A"], models.sklearn_name
    _poll(lambda: a.metric("mlkube_model_cache_bytes", model=name) == 0)  # evicted again
    loads = a.metric("mlkube_model_loads_total", model=name, outcome="success")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=a.url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post(f"/v1/models/{name}:predict", json={"instances": ROWS[:1]})
                for _ in range(20)
            ))  # fmt: skip

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.text for r in responses}) == 1
    assert a.metric("mlkube_model_loads_total", model=name, outcome="success") == loads + 1


def test_v1_v2_and_grpc_predict_what_the_model_predicts(
    servers: dict[str, ModelServerProcess], models: Models, tmp_path: Path
) -> None:
    a, name = servers["A"], models.sklearn_name
    expected = _direct(models, name, pd.DataFrame(ROWS), tmp_path).tolist()

    records = a.post(f"/v1/models/{name}:predict", {"instances": ROWS})
    rows = a.post(f"/v1/models/{name}:predict", {"instances": [list(r.values()) for r in ROWS]})
    v2 = a.post(f"/v2/models/{name}/infer", _v2_columns(ROWS, "FP32"))
    grpc = _grpc_infer(a.grpc_port, name, [
        (c, "BYTES" if isinstance(ROWS[0][c], str) else "FP64",
         np.array([r[c] for r in ROWS], dtype=object if isinstance(ROWS[0][c], str) else float))
        for c in COLUMNS
    ])  # fmt: skip

    assert records.json()["predictions"] == expected
    assert rows.json()["predictions"] == expected
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["data"] == expected  # FP32 in the request changed nothing
    assert v2.json()["outputs"][0]["datatype"] == "FP64"
    assert grpc.outputs[0].as_numpy().tolist() == expected


def test_concurrent_requests_are_batched_without_changing_predictions(
    servers: dict[str, ModelServerProcess], models: Models, tmp_path: Path
) -> None:
    a, name = servers["A"], models.sklearn_name
    frame = _insurance_frame()[COLUMNS].head(32)
    records = frame.to_dict(orient="records")
    model = _direct_model(name, tmp_path)
    # what a bare model answers to each 1-row request
    expected = [model.predict(frame.iloc[i : i + 1]).tolist()[0] for i in range(len(frame))]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=a.url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post(f"/v1/models/{name}:predict", json={"instances": [record]})
                for record in records
            ))  # fmt: skip

    answers = [r.json()["predictions"][0] for r in asyncio.run(burst())]
    assert answers == expected


BAD_INPUTS = [
    ({"instances": [{k: v for k, v in ROWS[0].items() if k != "bmi"}]}, 400, "column(s): bmi"),
    ({"instances": [{**ROWS[0], "height": 1.8}]}, 400, "unknown column(s): height"),
    ({"instances": [{**ROWS[0], "age": "old"}]}, 400, "column 'age': expected long"),
    ({"instances": [{**ROWS[0], "children": 1.5}]}, 400, "column 'children': expected long"),
    ({"instances": [[19, "female", 27.9]]}, 400, "row 0 has 3 values, expected 6"),
    ({"instances": []}, 400, "non-empty"),
    ({"rows": []}, 400, 'expected "instances" or "inputs"'),
    ([1, 2], 400, "expected a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "message"), BAD_INPUTS)
def test_bad_input_is_a_4xx_that_names_the_problem(
    servers: dict[str, ModelServerProcess], models: Models, body: Any, status: int, message: str
) -> None:
    response = servers["A"].post(f"/v1/models/{models.sklearn_name}:predict", body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_json_unknown_model_and_bad_v2_are_4xx(
    servers: dict[str, ModelServerProcess], models: Models
) -> None:
    a, name = servers["A"], models.sklearn_name
    malformed = httpx.post(f"{a.url}/v1/models/{name}:predict", content=b'{"instances": [',
                           headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert malformed.status_code == 400
    assert "format" in malformed.json()["error"] or "JSON" in malformed.json()["error"]
    unknown = a.post("/v1/models/nope:predict", {"instances": ROWS[:1]})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    v2_missing = _v2_columns(ROWS[:1])
    v2_missing["inputs"] = v2_missing["inputs"][1:]
    missing = a.post(f"/v2/models/{name}/infer", v2_missing)
    assert missing.status_code == 400 and "missing column(s): age" in missing.json()["error"]
    no_type = httpx.post(f"{a.url}/v1/models/{name}:predict", content=b'{"instances": [1]}',
                         headers={"content-type": "text/plain"}, timeout=60)  # fmt: skip
    assert no_type.status_code == 400


def test_no_download_is_left_in_tmpdir(servers: dict[str, ModelServerProcess]) -> None:
    for server in servers.values():
        assert list(server.tmpdir.iterdir()) == [], "the server left files in $TMPDIR"


# -- B: any model by name -----------------------------------------------------------------
def test_torch_model_over_v1_v2_and_grpc(
    servers: dict[str, ModelServerProcess], models: Models, tmp_path: Path
) -> None:
    b, name = servers["B"], models.torch_name
    x = np.random.default_rng(1).random((3, 4), dtype=np.float32)
    expected = _direct(models, name, x, tmp_path).astype(np.float32)

    v1 = b.post(f"/v1/models/{name}:predict", {"instances": x.tolist()})
    v2 = b.post(f"/v2/models/{name}/infer", {"inputs": [
        {"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()}
    ]})  # fmt: skip
    grpc = _grpc_infer(b.grpc_port, name, [("x", "FP32", x)])

    assert v1.status_code == 200, v1.text
    assert np.array_equal(np.asarray(v1.json()["predictions"], dtype=np.float32), expected)
    assert v2.status_code == 200, v2.text
    out = v2.json()["outputs"][0]
    assert out["shape"] == [3, 3]
    assert np.array_equal(np.asarray(out["data"], dtype=np.float32).reshape(3, 3), expected)
    assert np.array_equal(grpc.outputs[0].as_numpy().reshape(3, 3), expected)

    wrong = b.post(f"/v1/models/{name}:predict", {"instances": [[1.0, 2.0, 3.0]]})
    assert wrong.status_code == 400
    assert "expected shape (N, 4), got (1, 3)" in wrong.json()["error"]
    strings = b.post(f"/v1/models/{name}:predict", {"instances": [["a", "b", "c", "d"]]})
    assert strings.status_code == 400 and "expected numbers" in strings.json()["error"]


def test_sklearn_by_name_and_unknown_name(
    servers: dict[str, ModelServerProcess], models: Models, tmp_path: Path
) -> None:
    b = servers["B"]
    expected = _direct(models, models.sklearn_name, pd.DataFrame(ROWS), tmp_path).tolist()
    answer = b.post(f"/v1/models/{models.sklearn_name}:predict", {"instances": ROWS})
    assert answer.json()["predictions"] == expected
    unknown = b.post("/v1/models/no-such-model:predict", {"instances": ROWS})
    assert unknown.status_code == 404
    assert "no-such-model" in unknown.json()["error"]
    assert "no-such-model" not in b.get("/v1/models").json()["models"]


def test_explain_endpoint(servers: dict[str, ModelServerProcess], models: Models) -> None:
    b = servers["B"]
    body = {"instances": [{"a": 1.0, "b": 2.0}]}
    explained = b.post(f"/v1/models/{models.explainable_name}:explain", body)
    assert explained.status_code == 200, explained.text
    assert explained.json()["explanations"] == [{"a": 1.0, "b": 2.0}]
    predicted = b.post(f"/v1/models/{models.explainable_name}:predict", body)
    assert predicted.json()["predictions"] == [3.0]
    none = b.post(f"/v1/models/{models.sklearn_name}:explain", {"instances": ROWS[:1]})
    assert none.status_code == 501 and "carries no explainer" in none.json()["error"]


def test_missing_artifacts_are_a_503_and_the_server_stays_up(
    servers: dict[str, ModelServerProcess], models: Models
) -> None:
    b, name = servers["B"], models.broken_name
    for _ in range(2):  # the second answer comes from the backoff, without a new attempt
        broken = b.post(f"/v1/models/{name}:predict", {"instances": ROWS[:1]})
        assert broken.status_code == 503
        assert f"Failed to load models:/{name}@champion" in broken.json()["error"]
    assert b.alive()
    assert b.post(f"/v1/models/{models.sklearn_name}:predict", {"instances": ROWS[:1]}).is_success
    assert b.metric("mlkube_model_loads_total", model=name, outcome="failure") >= 1


# -- C: LRU under a memory budget of resident bytes ---------------------------------------
def test_budget_counts_resident_memory_and_evicts_least_recently_used_first(
    servers: dict[str, ModelServerProcess], models: Models
) -> None:
    """Budget: 1.5 forests. The linear model, then forest A, fit; forest B does not: the
    linear model goes first (least recently used, although the smallest), then forest A."""
    c = servers["C"]
    small, (forest_a, forest_b) = models.small_name, models.forest_names
    linear_row = {"instances": ROWS[:1]}
    forest_row = {"instances": [{f"x{i}": 0.5 for i in range(5)}]}

    assert c.post(f"/v1/models/{small}:predict", linear_row).is_success
    assert c.post(f"/v1/models/{forest_a}:predict", forest_row).is_success
    small_bytes = c.metric("mlkube_model_cache_bytes", model=small)
    forest_a_bytes = c.metric("mlkube_model_cache_bytes", model=forest_a)
    # what /metrics shows is memory: at least the forest's tree arrays, the linear model
    # a small fraction of that
    assert forest_a_bytes >= 0.9 * models.forest_bytes, (forest_a_bytes, models.forest_bytes)
    assert small_bytes < models.forest_bytes / 10, (small_bytes, models.forest_bytes)
    assert c.metric("mlkube_model_cache_evictions_total", model=small, reason="memory") == 0

    assert c.post(f"/v1/models/{forest_b}:predict", forest_row).is_success
    assert c.metric("mlkube_model_cache_evictions_total", model=small, reason="memory") == 1
    assert c.metric("mlkube_model_cache_evictions_total", model=forest_a, reason="memory") == 1
    assert c.metric("mlkube_model_cache_bytes", model=small) == 0
    assert c.metric("mlkube_model_cache_bytes", model=forest_a) == 0
    # Loaded where two evicted models lived: heap pages malloc_trim could not hand back
    # (fragments) are reused without growing the RSS, so less than forest A counted (87% seen).
    assert c.metric("mlkube_model_cache_bytes", model=forest_b) >= 0.75 * models.forest_bytes

    # the linear model again: it fits beside forest B, nothing else goes
    assert c.post(f"/v1/models/{small}:predict", linear_row).is_success
    assert c.metric("mlkube_model_cache_evictions_total", model=forest_b, reason="memory") == 0
    assert c.metric("mlkube_model_loads_total", model=small, outcome="success") == 2
    assert c.metric("mlkube_artifact_downloads_total", model=small) == 1
