"""The baseline: a bare kserve.Model holding an MLflow pyfunc in memory (loaded at start).

predict() is synchronous, as a plain KServe custom model would write it, so it runs on the
event loop. It answers Open Inference Protocol v2 (REST and gRPC): the request's inputs
become a DataFrame (kserve's `as_dataframe`), the pyfunc predicts, one output comes back.
Usage: python bare_server.py MODEL_DIR HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import sys
import uuid
import warnings
from typing import Any

import mlflow.pyfunc
import numpy as np
from fastapi.exceptions import FastAPIDeprecationWarning
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.numpy_codec import from_np_dtype

# same courtesy as mlkube's server: without it the log write per request dominates
warnings.filterwarnings(
    "ignore", message="ORJSONResponse is deprecated", category=FastAPIDeprecationWarning
)


class BareModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.model = mlflow.pyfunc.load_model(path)
        self.ready = True

    def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:
        result = np.asarray(self.model.predict(payload.as_dataframe()))
        output = InferOutput(
            name="predict",
            shape=list(result.shape),
            datatype=from_np_dtype(result.dtype),
            data=result.tolist(),
        )
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=[output],
        )


if __name__ == "__main__":
    path, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    server = ModelServer(http_port=http_port, grpc_port=grpc_port, enable_latency_logging=False)
    server.start([BareModel("bench", path)])
