"""Hourly temperature forecasting: 72 hours in, the next 24 hours out, with a PyTorch GRU.

Offline sample: the hourly Seattle temperatures of 2010 shipped in `vega_datasets`.
A dataset.uri gives any table with a time column `date` and a temperature column (`temp`,
or dataset.target), such as the one the retrain flow's ingest keeps up to date.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mlkube.training.tasks.base import DataError, Report, SearchSpace, Task, TaskData
from mlkube.training.tasks.data import read_table, require_columns
from mlkube.training.tasks.torch_loop import (
    device,
    epochs_budget,
    epochs_of,
    fit_epochs,
    seed_everything,
)

HOURS_IN = 72
HOURS_OUT = 24
# Windows start every few hours: neighbours overlap almost fully and add little.
WINDOW_STRIDE = 3
HOLDOUT_FRACTION = 0.15
VALIDATION_FRACTION = 0.15
TIME_COLUMN = "date"
PIP_REQUIREMENTS = ["torch==2.13.0", "numpy"]


def offline_sample() -> pd.DataFrame:
    from vega_datasets import local_data

    sample: pd.DataFrame = local_data.seattle_temps()
    return sample


def hourly_series(frame: pd.DataFrame, column: str) -> np.ndarray:
    """One value per hour, in time order; short gaps interpolated."""
    series = frame.set_index(pd.to_datetime(frame[TIME_COLUMN]))[column].astype("float64")
    series = series[~series.index.duplicated(keep="last")].sort_index()
    hourly = series.resample("1h").mean().interpolate(limit=6).dropna()
    return hourly.to_numpy()


def windows(series: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    starts = range(0, len(series) - HOURS_IN - HOURS_OUT + 1, stride)
    x = np.stack([series[s : s + HOURS_IN] for s in starts]).astype("float32")
    y = np.stack([series[s + HOURS_IN : s + HOURS_IN + HOURS_OUT] for s in starts])
    return x, y.astype("float32")


def build_forecaster(hidden: int, layers: int, mean: float, std: float) -> Any:
    import torch
    from torch import nn

    class Forecaster(nn.Module):
        """Raw temperatures in, raw temperatures out: scaling lives inside the model."""

        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(1, hidden, num_layers=layers, batch_first=True)
            self.head = nn.Linear(hidden, HOURS_OUT)
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

        def forward(self, hours: torch.Tensor) -> torch.Tensor:
            mean, std = self.get_buffer("mean"), self.get_buffer("std")
            _, state = self.gru(((hours - mean) / std).unsqueeze(-1))
            forecast: torch.Tensor = self.head(state[-1]) * std + mean
            return forecast

    return Forecaster()


class AtmosTemperatureTask(Task):
    name = "atmos-temperature"
    model_modules = ("mlflow.models", "mlflow.pytorch", "torch")
    trial_modules = ("torch",)
    metric = "mae"
    mode = "min"
    has_epochs = True
    max_epochs = 8
    checkpoints = True
    problems = ("regression",)

    @property
    def search_space(self) -> SearchSpace:
        return {
            "lr": {"loguniform": [1e-3, 3e-2]},
            "hidden": {"choice": [16, 32, 64]},
            "layers": {"choice": [1, 2]},
            "epochs": {"randint": [2, 9]},
        }

    def budget(self, space: SearchSpace) -> int:
        return epochs_budget(space, self.max_epochs)

    def metric_names(self) -> list[str]:
        return ["mae", "rmse"]

    def load(self, uri: str | None, target: str | None, seed: int) -> TaskData:
        column = target or "temp"
        frame = read_table(uri) if uri else offline_sample()
        source = uri or "the offline sample"
        require_columns(frame, [TIME_COLUMN, column], source, "dataset.target")
        series = hourly_series(frame, column)
        if len(series) < 10 * (HOURS_IN + HOURS_OUT):
            raise DataError(f"dataset.uri: {source} has {len(series)} hours, too few")
        x, y = windows(series, WINDOW_STRIDE)
        holdout_start = int(len(x) * (1 - HOLDOUT_FRACTION))
        # The holdout comes after everything the search sees (no look-ahead).
        gap = (HOURS_IN + HOURS_OUT) // WINDOW_STRIDE
        return TaskData(
            search=(x[: holdout_start - gap], y[: holdout_start - gap]),
            holdout=(x[holdout_start:], y[holdout_start:]),
            description={"hours": len(series), "windows": len(x), "target": column},
        )

    def _model(self, config: Mapping[str, Any], x: np.ndarray) -> Any:
        return build_forecaster(
            int(config.get("hidden", 32)),
            int(config.get("layers", 1)),
            float(x.mean()),
            float(x.std()),
        )

    def _fit(
        self, config: Mapping[str, Any], x: np.ndarray, y: np.ndarray, seed: int,
        validate: Any = None, report: Report | None = None,
    ) -> Any:  # fmt: skip
        import torch

        seed_everything(seed)
        return fit_epochs(
            self._model(config, x), torch.from_numpy(x), torch.from_numpy(y), torch.nn.L1Loss(),
            float(config.get("lr", 1e-2)), epochs_of(config), seed, validate, report,
        )  # fmt: skip

    def train(self, config: Mapping[str, Any], data: TaskData, report: Report, seed: int) -> None:
        import torch

        x, y = data.search
        split = int(len(x) * (1 - VALIDATION_FRACTION))
        where = device()
        valid_x = torch.from_numpy(x[split:]).to(where)
        valid_y = torch.from_numpy(y[split:]).to(where)

        def validate(model: Any) -> dict[str, float]:
            error = model(valid_x) - valid_y
            return {
                "mae": float(error.abs().mean()),
                "rmse": float(error.pow(2).mean().sqrt()),
            }

        self._fit(config, x[:split], y[:split], seed, validate, report)

    def fit(self, config: Mapping[str, Any], data: TaskData, seed: int) -> Any:
        x, y = data.search
        return self._fit(config, x, y, seed)

    def log_model(self, model: Any, data: TaskData, name: str) -> str:
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        example = data.search[0][:4]
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        with warnings.catch_warnings():
            # torch.export notes the GRU's flattened weights; they are exported correctly.
            warnings.filterwarnings("ignore", message="The tensor attributes", category=UserWarning)
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                signature=infer_signature(example, output),
                # A batch of more than one keeps the exported batch size dynamic.
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
            )
        return str(info.model_uri)

    def evaluate(self, loaded_model: Any, data: TaskData) -> dict[str, float]:
        x, y = data.holdout
        error = np.asarray(loaded_model.predict(x), dtype="float64") - y
        return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean()))}
