"""The torch tasks on CUDA, with spec.resources.gpu asking Ray for a GPU per trial. Skipped,
saying why, on a machine without one (this project's machines have none)."""

from __future__ import annotations

import pytest

from mlkube.flows.train import train
from tests.integration.conftest import trainingrun


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Decided at collection, so that a machine without a GPU starts no Ray or Prefect for it.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not cuda_available(),
        reason="no CUDA device: torch.cuda.is_available() is false on this machine",
    ),
]


@pytest.mark.usefixtures("ray_local", "prefect_api", "local_mlflow")
@pytest.mark.parametrize("task", ["mnist", "atmos-temperature"])
def test_the_torch_tasks_train_on_cuda(task: str, model_name: str) -> None:
    from mlkube.training.tasks.torch_loop import device

    assert device().type == "cuda"
    spec = {
        "task": task,
        "model": {"name": model_name},
        "resources": {"gpu": 1},
        "tuning": {"numTrials": 2, "maxConcurrentTrials": 1, "scheduler": "asha",
                   "searchSpace": {"epochs": {"choice": [2]}}},
    }  # fmt: skip
    result = train(trainingrun(f"gpu-{task}", spec), show_progress=False)
    assert result.version == 1 and len(result.trials) == 2
    assert all(t.error is None and t.epochs >= 1 for t in result.trials)
