"""Digit classification with a small PyTorch CNN; explanations by nearest training examples.

Offline sample: scikit-learn's bundled 8x8 digits. A dataset.uri gives any MNIST-style CSV:
a `label` column (or dataset.target) and one column per pixel of a square image.
The logged model is an MLflow pyfunc whose `explain` returns, for each input, the training
examples nearest to it in the CNN's penultimate-layer features, with their labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlkube.training.tasks.base import DataError, Mode, Report, SearchSpace, Task, TaskData
from mlkube.training.tasks.data import read_table, require_columns
from mlkube.training.tasks.torch_loop import (
    device,
    epochs_budget,
    epochs_of,
    fit_epochs,
    seed_everything,
)

HOLDOUT_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
NEAREST = 3
CLASSES = 10
PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "mlkube"]


def build_cnn(side: int, channels: int, hidden: int) -> Any:
    from torch import nn

    class DigitCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, 2 * channels, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(2 * channels * (side // 2) ** 2, hidden),
                nn.ReLU(),
            )
            self.classify = nn.Linear(hidden, CLASSES)

        def embed(self, pixels: Any) -> Any:
            """The penultimate layer: what explanations compare."""
            return self.features(pixels.view(-1, 1, side, side))

        def forward(self, pixels: Any) -> Any:
            return self.classify(self.embed(pixels))

    return DigitCNN()


def offline_sample() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype("float32"), digits.target.astype("int64")


def read_mnist_csv(uri: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    frame = read_table(uri)
    require_columns(frame, [target], uri, "dataset.target")
    pixels = frame.drop(columns=[target]).to_numpy(dtype="float32")
    side = math.isqrt(pixels.shape[1])
    if side * side != pixels.shape[1]:
        raise DataError(f"dataset.uri: {uri} has {pixels.shape[1]} pixel columns, not a square")
    scale = 255.0 if pixels.max() > 1.0 else 1.0
    return pixels / scale, frame[target].to_numpy(dtype="int64")


class MnistTask(Task):
    name = "mnist"
    model_modules = ("mlflow.pyfunc", "torch")
    trial_modules = ("torch",)
    metric = "loss"
    mode = "min"
    has_epochs = True
    max_epochs = 8
    checkpoints = True
    problems = ("classification",)

    @property
    def search_space(self) -> SearchSpace:
        return {
            "lr": {"loguniform": [1e-3, 1e-2]},
            "channels": {"choice": [8, 16]},
            "hidden": {"choice": [32, 64]},
            "epochs": {"randint": [2, 9]},
        }

    def budget(self, space: SearchSpace) -> int:
        return epochs_budget(space, self.max_epochs)

    def metric_names(self) -> list[str]:
        return ["loss", "accuracy"]

    def mode_for(self, metric: str) -> Mode:
        return "max" if metric == "accuracy" else "min"

    def load(self, uri: str | None, target: str | None, seed: int) -> TaskData:
        from sklearn.model_selection import train_test_split

        pixels, labels = read_mnist_csv(uri, target or "label") if uri else offline_sample()
        side = math.isqrt(pixels.shape[1])
        x_search, x_holdout, y_search, y_holdout = train_test_split(
            pixels, labels, test_size=HOLDOUT_FRACTION, random_state=seed, stratify=labels
        )
        return TaskData(
            search=(x_search, y_search),
            holdout=(x_holdout, y_holdout),
            description={"images": len(pixels), "side": side, "source": uri or "sklearn digits"},
        )

    @staticmethod
    def side(data: TaskData) -> int:
        return math.isqrt(data.search[0].shape[1])

    def _fit(
        self, config: Mapping[str, Any], x: np.ndarray, y: np.ndarray, seed: int, side: int,
        validate: Any = None, report: Report | None = None,
    ) -> Any:  # fmt: skip
        import torch

        seed_everything(seed)
        network = build_cnn(side, int(config.get("channels", 8)), int(config.get("hidden", 32)))
        return fit_epochs(
            network, torch.from_numpy(x), torch.from_numpy(y), torch.nn.CrossEntropyLoss(),
            float(config.get("lr", 3e-3)), epochs_of(config), seed, validate, report,
        )  # fmt: skip

    def train(self, config: Mapping[str, Any], data: TaskData, report: Report, seed: int) -> None:
        import torch
        from sklearn.model_selection import train_test_split

        x, y = data.search
        x_train, x_valid, y_train, y_valid = train_test_split(
            x, y, test_size=VALIDATION_FRACTION, random_state=seed, stratify=y
        )
        where = device()
        valid_x, valid_y = torch.from_numpy(x_valid).to(where), torch.from_numpy(y_valid).to(where)

        def validate(network: Any) -> dict[str, float]:
            logits = network(valid_x)
            return {
                "loss": float(torch.nn.functional.cross_entropy(logits, valid_y)),
                "accuracy": float((logits.argmax(1) == valid_y).float().mean()),
            }

        self._fit(config, x_train, y_train, seed, self.side(data), validate, report)

    def fit(self, config: Mapping[str, Any], data: TaskData, seed: int) -> Any:
        x, y = data.search
        return (config, self._fit(config, x, y, seed, self.side(data)))

    def log_model(self, model: Any, data: TaskData, name: str) -> str:
        import tempfile

        import mlflow.pyfunc
        import torch
        from mlflow.models import infer_signature

        config, network = model
        side = self.side(data)
        x, y = data.search
        with tempfile.TemporaryDirectory() as folder:
            weights, bank = Path(folder) / "weights.pt", Path(folder) / "bank.npz"
            torch.save(network.state_dict(), weights)
            with torch.no_grad():
                features = network.embed(torch.from_numpy(x)).numpy()
            np.savez(bank, features=features, labels=y)
            model_config = {
                "side": side,
                "channels": int(config.get("channels", 8)),
                "hidden": int(config.get("hidden", 32)),
            }
            example = x[:2]
            with torch.no_grad():
                labels = network(torch.from_numpy(example)).argmax(1).numpy().astype("int64")
            info = mlflow.pyfunc.log_model(
                name=name,
                # Models from code: the class is imported at load time, nothing is pickled.
                python_model=str(Path(__file__).with_name("mnist_model.py")),
                model_config=model_config,
                artifacts={"weights": str(weights), "bank": str(bank)},
                signature=infer_signature(example, labels),
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
            )
        return str(info.model_uri)

    def evaluate(self, loaded_model: Any, data: TaskData) -> dict[str, float]:
        x, y = data.holdout
        probabilities = loaded_model.unwrap_python_model().predict_proba(x)
        picked = np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)
        return {
            "loss": float(-np.log(picked).mean()),
            "accuracy": float((probabilities.argmax(axis=1) == y).mean()),
        }
