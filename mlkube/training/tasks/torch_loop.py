"""The epoch loop the PyTorch tasks share: train, validate, report, checkpoint, repeat."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from mlkube.training.tasks.base import Report, SearchSpace, highest, restored_state

# Torch tasks read a few steering values from a trial's config besides the tuned ones.
BATCH_SIZE = 64


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def device() -> Any:
    """CUDA when this process sees a GPU (Ray shows a trial only the GPUs it was given:
    none unless spec.resources.gpu asks), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pack(state: dict[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _unpack(blob: bytes, where: Any) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = torch.load(io.BytesIO(blob), map_location=where, weights_only=True)
    return state


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
    """Adam over shuffled mini-batches on device(); after each epoch `validate` feeds
    `report`, with the weights, the optimizer and the shuffling's state, so that a resumed
    trial goes on from its last epoch as if it had never stopped. Returns the model on the
    CPU."""
    import torch

    seed_everything(seed)
    where = device()
    model = model.to(where)
    inputs, targets = inputs.to(where), targets.to(where)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    restored = restored_state(report) if report is not None else None
    if restored:
        state = _unpack(restored["torch"], where)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        done = int(restored["epoch"])
    for epoch in range(done + 1, epochs + 1):
        model.train()
        order = torch.randperm(len(inputs), generator=generator).to(where)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
        if validate is not None and report is not None:
            model.eval()
            with torch.no_grad():
                metrics = validate(model)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
            }
            report(metrics, {"epoch": epoch, "torch": _pack(state)})
    model.eval()
    return model.to("cpu")


def epochs_budget(space: SearchSpace, default: int) -> int:
    """Most epochs a trial of `space` trains for."""
    return int(highest(space["epochs"])) if "epochs" in space else default


def epochs_of(config: Any) -> int:
    return int(config.get("epochs", 1))
