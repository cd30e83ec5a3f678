"""The baseline: a bare kserve.Model holding an MLflow model in memory (loaded at start).

predict() is synchronous, as a plain KServe custom model would write it, so it runs on the
event loop. Usage: python bare_server.py MODEL_DIR HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import mlflow.pyfunc
import pandas as pd
from fastapi.exceptions import FastAPIDeprecationWarning
from kserve import Model, ModelServer

# same courtesy as mlkube's server: without it the log write per request dominates
warnings.filterwarnings(
    "ignore", message="ORJSONResponse is deprecated", category=FastAPIDeprecationWarning
)


class BareModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.model = mlflow.pyfunc.load_model(path)
        self.ready = True

    def predict(self, payload: Any, headers: Any = None) -> dict[str, Any]:
        frame = pd.DataFrame.from_records(payload["instances"])
        return {"predictions": self.model.predict(frame).tolist()}


if __name__ == "__main__":
    path, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    server = ModelServer(http_port=http_port, grpc_port=grpc_port, enable_latency_logging=False)
    server.start([BareModel("bench", path)])
