"""The operator's handler metrics: kopf's retries count as `retry`, the rest as `error`."""

from __future__ import annotations

import kopf
import pytest
from prometheus_client import REGISTRY

from mlkube.operator.metrics import measured


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"resource": "test", "handler": "h", **labels}) or 0.0


def runs(result: str) -> float:
    return sample("mlkube_operator_reconciles_total", result=result)


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (kopf.TemporaryError("later", delay=1), "retry"),
        (kopf.PermanentError("never"), "error"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_a_failed_run_counts_by_kind(error: Exception, result: str) -> None:
    @measured("test", "h")
    def handler() -> None:
        raise error

    kind = type(error).__name__
    before, errors_before = runs(result), sample("mlkube_operator_errors_total", error=kind)
    with pytest.raises(type(error)):
        handler()
    assert runs(result) == before + 1
    assert sample("mlkube_operator_errors_total", error=kind) == errors_before + 1


def test_a_run_that_returns_is_ok() -> None:
    before = runs("ok")
    assert measured("test", "h")(lambda: 7)() == 7
    assert runs("ok") == before + 1
