"""Shared, expensive fixtures for the integration tests: one Ray and one Prefect API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlkube.api import TrainingRun, parse_resource

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session, started as local mode starts it."""
    import ray

    from mlkube.training.tune import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A real Prefect API (temporary server on a sqlite file) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def local_mlflow() -> Any:
    """The local MLflow store of local mode (sqlite + artifact folder under MLKUBE_HOME)."""
    import mlflow
    from mlflow import MlflowClient

    from mlkube.local import local_tracking_uri

    uri = local_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri)


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name of this test's own."""
    return f"{request.node.name[:40].replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:6]}"


def trainingrun(name: str, spec: dict[str, Any]) -> TrainingRun:
    document = {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    run = parse_resource(document)
    assert isinstance(run, TrainingRun)
    return run


def example(case: str, kind: str = "trainingrun") -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "examples" / case / f"{kind}.yaml").read_text()))
