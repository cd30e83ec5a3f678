"""Running the operator in e2e tests: kopf's KopfRunner with short intervals."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kopf.testing import KopfRunner

# Short intervals for tests. Read once, when kopf imports the handlers (after collection).
os.environ.update({
    "MLKUBE_OPERATOR_STATUS_POLL_SECONDS": "0.5",
    "MLKUBE_OPERATOR_ALIAS_POLL_SECONDS": "1",
    "MLKUBE_OPERATOR_FAILED_JOB_GRACE_SECONDS": "5",
    "MLKUBE_OPERATOR_WATCH_TIMEOUT_SECONDS": "5",
    "MLKUBE_OPERATOR_MLFLOW_BACKOFF_INITIAL_SECONDS": "0.5",
    "MLKUBE_OPERATOR_MLFLOW_BACKOFF_MAX_SECONDS": "2",
    # The tests' TrainingRuns name the loopback MLflow server in spec.mlflow.trackingUri.
    "MLKUBE_OPERATOR_MLFLOW_ALLOWED_HOSTS": '["127.0.0.1"]',
})  # fmt: skip


@contextlib.contextmanager
def running_operator(namespace: str, liveness_port: int | None = None) -> Iterator[KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace]
    if liveness_port:
        args += ["--liveness", f"http://127.0.0.1:{liveness_port}/healthz"]
    with KopfRunner([*args, "-m", "mlkube.operator.handlers"], timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-4000:]
    assert runner.exit_code == 0, runner.output[-4000:]
    assert "Traceback" not in runner.output, runner.output[-4000:]
