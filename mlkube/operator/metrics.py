"""Prometheus metrics of the operator: reconciles, their durations, errors."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import kopf
from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter(
    "mlkube_operator_reconciles_total",
    "Handler runs, by resource, handler and result (ok, retry, error).",
    ["resource", "handler", "result"],
)
RECONCILE_SECONDS = Histogram(
    "mlkube_operator_reconcile_duration_seconds",
    "Handler run time.",
    ["resource", "handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter(
    "mlkube_operator_errors_total",
    "Handler errors, by resource, handler and exception type.",
    ["resource", "handler", "error"],
)
CHILDREN_CREATED = Counter(
    "mlkube_operator_children_created_total", "RayJobs and InferenceServices created.", ["kind"]
)
MLFLOW_ERRORS = Counter(
    "mlkube_operator_mlflow_errors_total", "MLflow calls that failed (unreachable or 5xx)."
)
TRANSITIONS = Counter(
    "mlkube_operator_phase_transitions_total", "Status phase changes.", ["resource", "phase"]
)

F = TypeVar("F", bound=Callable[..., Any])


def measured(resource: str, handler: str) -> Callable[[F], F]:
    """Count and time a (sync) handler; kopf's retry exceptions count as `retry`."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = "ok"
            try:
                return function(*args, **kwargs)
            except Exception as error:
                result = "retry" if isinstance(error, kopf.TemporaryError) else "error"
                ERRORS.labels(resource, handler, type(error).__name__).inc()
                raise
            finally:
                RECONCILES.labels(resource, handler, result).inc()
                RECONCILE_SECONDS.labels(resource, handler).observe(time.perf_counter() - started)

        return wrapper  # type: ignore[return-value]

    return decorate


def serve_metrics(port: int, address: str = "0.0.0.0") -> None:
    """/metrics on `port` in a background thread (0: off)."""
    if port:
        start_http_server(port, addr=address)
