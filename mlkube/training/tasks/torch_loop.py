"""The epoch loop the PyTorch tasks share: train, validate, report, repeat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlkube.training.tasks.base import Report

# Torch tasks read a few steering values from a trial's config besides the tuned ones.
BATCH_SIZE = 64


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def fit_epochs(
    model: Any,
    inputs: Any,
    targets: Any,
    loss_fn: Any,
    lr: float,
    epochs: int,
    seed: int,
    validate: Callable[[Any], dict[str, float]] | None = None,
    report: Report | None = None,
) -> Any:
    """Adam over shuffled mini-batches; after each epoch `validate` feeds `report`."""
    import torch

    seed_everything(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
        if validate is not None and report is not None:
            model.eval()
            with torch.no_grad():
                report(validate(model))
    model.eval()
    return model


def epochs_of(config: Any) -> int:
    return int(config.get("epochs", 1))
