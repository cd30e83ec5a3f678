"""Runs in a pod of the test node: asks a predictor for predictions over v1 REST, v2 REST
and v2 gRPC, loads the same model version from MLflow directly, and prints one JSON object
with everything the test compares. With "order" (model names), it calls those models of one
predictor in turn over v1 instead, and asks each one's readiness. Arguments: a JSON object
(see `main`)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def post(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response), time.monotonic() - started


def v2_inputs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def datatype(value: Any) -> str:
        if isinstance(value, str):
            return "BYTES"
        return "INT64" if isinstance(value, int) else "FP64"

    return [
        {"name": name, "shape": [len(rows)], "datatype": datatype(rows[0][name]),
         "data": [row[name] for row in rows]}
        for name in rows[0]
    ]  # fmt: skip


def grpc_predictions(address: str, model: str, rows: list[dict[str, Any]]) -> list[float]:
    import numpy as np
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    inputs = []
    for spec in v2_inputs(rows):
        data = np.array(spec["data"], dtype=object if spec["datatype"] == "BYTES" else None)
        item = InferInput(spec["name"], spec["shape"], spec["datatype"])
        item.set_data_from_numpy(data)
        inputs.append(item)

    async def call() -> Any:
        client = InferenceGRPCClient(address, timeout=60)
        try:
            return await client.infer(InferRequest(model_name=model, infer_inputs=inputs))
        finally:
            await client.close()

    import asyncio

    response = asyncio.run(call())
    return [float(v) for v in response.outputs[0].as_numpy().tolist()]


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("mlkube_model_", "mlkube_artifact_")):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def several(base: str, order: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each model of `order` in turn over v1, each one's readiness, the metrics after."""
    predictions = [
        post(f"{base}/v1/models/{name}:predict", {"instances": rows})[0]["predictions"]
        for name in order
    ]
    ready = {name: status_of(f"{base}/v2/models/{name}/ready") for name in set(order)}
    return {"predictions": predictions, "ready": ready, "metrics": metrics(f"{base}/metrics")}


def main() -> None:
    args = json.loads(sys.argv[1])
    if args.get("order"):
        print(json.dumps(several(args["url"].rstrip("/"), args["order"], args["rows"])))
        return
    base, model, rows = args["url"].rstrip("/"), args["model"], args["rows"]
    out: dict[str, Any] = {}
    if args.get("served", True):
        v1, out["first_seconds"] = post(f"{base}/v1/models/{model}:predict", {"instances": rows})
        out["v1"] = v1["predictions"]
        v2, _ = post(f"{base}/v2/models/{model}/infer", {"inputs": v2_inputs(rows)})
        out["v2"] = v2["outputs"][0]["data"]
    if args.get("grpc"):
        out["grpc"] = grpc_predictions(args["grpc"], model, rows)
    if args.get("model_uris"):  # each version loaded straight from MLflow
        import mlflow.pyfunc
        import pandas as pd

        out["direct"] = {
            uri: [float(v) for v in mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(rows))]
            for uri in args["model_uris"]
        }
    if args.get("idle_seconds"):
        out["metrics_before_idle"] = metrics(f"{base}/metrics")
        time.sleep(args["idle_seconds"])
        out["metrics_after_idle"] = metrics(f"{base}/metrics")
        again, out["after_idle_seconds"] = post(
            f"{base}/v1/models/{model}:predict", {"instances": rows}
        )
        out["after_idle"] = again["predictions"]
        out["metrics_after_reload"] = metrics(f"{base}/metrics")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
