"""Runs in a pod of the test node: calls the models of one predictor in the given order over
v1 REST, asks each model's readiness, and prints one JSON object with the predictions, the
readiness answers and the predictor's mlkube metrics. Argument: a JSON object with "url"
(the predictor's base URL), "order" (model names, in call order) and "rows"."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("mlkube_model_", "mlkube_artifact_")):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def main() -> None:
    args = json.loads(sys.argv[1])
    base, rows = args["url"].rstrip("/"), args["rows"]
    predictions = [
        post(f"{base}/v1/models/{name}:predict", {"instances": rows})["predictions"]
        for name in args["order"]
    ]
    ready = {name: status_of(f"{base}/v2/models/{name}/ready") for name in set(args["order"])}
    print(json.dumps({"predictions": predictions, "ready": ready,
                      "metrics": metrics(f"{base}/metrics")}))  # fmt: skip


if __name__ == "__main__":
    main()
