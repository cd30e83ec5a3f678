"""The mnist task's MLflow model, logged as code: predicts digits and explains them by the
training examples nearest in the CNN's penultimate-layer features."""

from __future__ import annotations

from typing import Any

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel

from mlkube.training.tasks.mnist import CLASSES, NEAREST, build_cnn


class MnistModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        config = context.model_config
        self.side = int(config["side"])
        self.network = build_cnn(self.side, int(config["channels"]), int(config["hidden"]))
        self.network.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.network.eval()
        bank = np.load(context.artifacts["bank"])
        self.bank_features = torch.from_numpy(bank["features"])
        self.bank_labels = bank["labels"]

    def _pixels(self, model_input: Any) -> Any:
        import torch

        array = np.asarray(model_input, dtype="float32").reshape(-1, self.side * self.side)
        return torch.from_numpy(array)

    def predict_proba(self, model_input: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            return torch.softmax(self.network(self._pixels(model_input)), dim=1).numpy()

    # No type hints here: MLflow would read them as a schema of their own.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return self.predict_proba(model_input).argmax(axis=1).astype("int64")

    def explain(self, model_input: Any) -> list[dict[str, Any]]:
        """Per input: the predicted label, class probabilities and the nearest examples."""
        import torch

        with torch.no_grad():
            features = self.network.embed(self._pixels(model_input))
            probabilities = torch.softmax(self.network.classify(features), dim=1)
            distances = torch.cdist(features, self.bank_features)
        explained = []
        for row in range(len(features)):
            nearest = distances[row].argsort()[:NEAREST].tolist()
            explained.append(
                {
                    "label": int(probabilities[row].argmax()),
                    "probabilities": {
                        str(c): round(float(probabilities[row, c]), 6) for c in range(CLASSES)
                    },
                    "nearest": [
                        {
                            "index": i,
                            "label": int(self.bank_labels[i]),
                            "distance": round(float(distances[row, i]), 6),
                        }
                        for i in nearest
                    ],
                }
            )
        return explained


set_model(MnistModel())
