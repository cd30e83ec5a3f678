"""Trial workers started ahead of the search. A Ray worker process takes about 1.9 s to
start (Python, Ray, the task's imports); Tune asks for one only when it creates a trial,
after the flow's own setup. Asked for as soon as the driver is connected, the raylet starts
them while the flow sets up, and Tune's first trials lease them as they are.

The raylet hands an idle worker to an actor only when both have the same runtime
environment, byte for byte. Tune gives its trial actors environment variables of its own
(ray.tune.execution.class_cache); Ray's core worker lays them over the job's (a RayJob's
runtimeEnvYAML) as JSON with sorted keys and no spaces, or keeps Tune's as Python wrote them
when the job has none. trial_runtime_env() writes the same text: a test
(tests/integration/test_trial_workers.py) fails if a Ray upgrade changes either side.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# How long a started worker waits for its trial before the raylet ends it.
KEEP_ALIVE_SECONDS = 120
PRESTART_TIMEOUT_SECONDS = 5.0


def tune_trial_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables Tune gives every trial actor, as it computes them."""
    from ray.tune.execution import class_cache

    env_vars = dict(class_cache.DEFAULT_ENV_VARS)
    env_vars.update(
        {name: environ[name] for name in class_cache.ENV_VARS_TO_PROPAGATE if name in environ}
    )
    return env_vars


def trial_runtime_env(job_runtime_env: str, trial_env_vars: Mapping[str, str]) -> str:
    """The serialized runtime environment of a trial actor in a job whose own is
    `job_runtime_env` (serialized; "" or "{}" when it has none)."""
    from ray.runtime_env import RuntimeEnv

    job = json.loads(job_runtime_env or "{}")
    if not job:
        return str(RuntimeEnv(env_vars=dict(trial_env_vars)).serialize())
    merged = dict(job)
    merged["env_vars"] = {**(job.get("env_vars") or {}), **trial_env_vars}
    return json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prestart_trial_workers(count: int) -> None:
    """Asks this node's raylet for `count` idle workers fit for this job's Tune trials. An
    optimisation only: if Ray refuses, the trials start their own workers as before."""
    if count <= 0:
        return
    try:
        _prestart(count)
    except Exception as error:  # never worth failing a search for
        log.info("trial workers were not started ahead: %s", error)


def _prestart(count: int) -> None:
    import grpc
    import ray

    # Ray's own internals (pinned in pyproject.toml; not typed for outside use).
    worker: Any = ray._private.worker.global_worker
    protos: Any = importlib.import_module("ray.core.generated.node_manager_pb2")
    stubs: Any = importlib.import_module("ray.core.generated.node_manager_pb2_grpc")
    common: Any = importlib.import_module("ray.core.generated.common_pb2")

    job_env = worker.core_worker.get_job_config().runtime_env_info
    info = type(job_env)()
    info.CopyFrom(job_env)
    info.serialized_runtime_env = trial_runtime_env(
        job_env.serialized_runtime_env, tune_trial_env_vars(os.environ)
    )
    # Only this node's raylet is asked: trials that Ray places on other nodes start there.
    here = ray.get_runtime_context().get_node_id()
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    cpus = int(next((n["Resources"].get("CPU", 0) for n in nodes if n["NodeID"] == here), 0))
    if cpus < 1:
        return
    request = protos.PrestartWorkersRequest(
        language=common.PYTHON,
        job_id=worker.current_job_id.binary(),
        runtime_env_info=info,
        keep_alive_duration_secs=KEEP_ALIVE_SECONDS,
        num_workers=min(count, cpus),
    )
    address = f"{worker.node.node_ip_address}:{worker.node.node_manager_port}"
    with grpc.insecure_channel(address) as channel:
        stubs.NodeManagerServiceStub(channel).PrestartWorkers(
            request, timeout=PRESTART_TIMEOUT_SECONDS
        )
