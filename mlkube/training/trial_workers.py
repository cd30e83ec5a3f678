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

The workers belong to no job: the raylet gives one to the first job whose actor has the
same runtime environment. On a warm cluster a run leaves its successor's workers started as
it ends (leave_trial_workers), and notes so in a file of the head; the next run that finds
the note for its own runtime environment starts none itself, and its first trials take
those, already up.

Those workers also import what a trial imports (Ray Tune, pandas, the task's libraries) as
they start, through Ray's worker setup hook: a run on a warm cluster adds the hook to the
environment Tune gives its trial actors (set_up_trial_imports), so that it is part of the
runtime environment the started workers and the trial actors share.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How long a started worker waits for its trial before the raylet may end it: one started
# as a run begins, and one left for the next run on a warm cluster.
KEEP_ALIVE_SECONDS = 120
KEEP_AHEAD_SECONDS = 900
PRESTART_TIMEOUT_SECONDS = 5.0
# Where a run notes the workers it left (the head's own temporary directory, which every run
# forked there shares), and how long before their end a run no longer counts on them.
AHEAD_NOTE = Path(tempfile.gettempdir()) / "mlkube-trial-workers-ahead.json"
AHEAD_MARGIN_SECONDS = 30


# Ray's worker setup hook, as an environment variable of a runtime environment (the
# `worker_process_setup_hook` of a runtime env becomes this); Ray runs it in a new worker
# before the worker takes work.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
SETUP_HOOK = f"{__name__}.import_trial_modules"
TRIAL_MODULES_ENV = "MLKUBE_TRIAL_MODULES"
# What every trial imports, whatever its task: the trainable (Ray Tune) and its data.
TRIAL_BASE_MODULES = ("mlkube.training.tune_events", "pandas")


def set_up_trial_imports(task_modules: Sequence[str]) -> None:
    """Tune's trial actors of this process, and the workers started for them, import the
    trial's modules (TRIAL_BASE_MODULES and `task_modules`) as their worker starts."""
    from ray.tune.execution import class_cache

    class_cache.DEFAULT_ENV_VARS.update(
        {SETUP_HOOK_ENV: SETUP_HOOK, TRIAL_MODULES_ENV: ",".join(task_modules)}
    )


def import_trial_modules() -> None:
    """The setup hook, in a new Ray worker. A module that fails to import is left for the
    trial to report: the hook failing would end the worker."""
    wanted = [m for m in os.environ.get(TRIAL_MODULES_ENV, "").split(",") if m]
    for module in (*TRIAL_BASE_MODULES, *wanted):
        try:
            importlib.import_module(module)
        except Exception as error:
            log.warning("trial worker setup: %s not imported: %s", module, error)
            return


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
    """Asks this node's raylet for `count` idle workers fit for this job's Tune trials,
    unless the run before left them (leave_trial_workers). An optimisation only: if Ray
    refuses, the trials start their own workers as before."""
    if count <= 0:
        return
    try:
        runtime_env = _trial_runtime_env_info()
        if not take_ahead_note(AHEAD_NOTE, _digest(runtime_env), time.time()):
            _prestart(runtime_env, count, KEEP_ALIVE_SECONDS)
    except Exception as error:  # never worth failing a search for
        log.info("trial workers were not started ahead: %s", error)


def leave_trial_workers(count: int) -> None:
    """As a run on a warm cluster ends: starts `count` workers for the next run's first
    trials, kept for KEEP_AHEAD_SECONDS, and notes them in AHEAD_NOTE; and one for the next
    run's Ray job supervisor."""
    if count <= 0:
        return
    try:
        runtime_env = _trial_runtime_env_info()
        if _prestart(runtime_env, count, KEEP_AHEAD_SECONDS):
            write_ahead_note(AHEAD_NOTE, _digest(runtime_env), time.time() + KEEP_AHEAD_SECONDS)
        _prestart(_supervisor_runtime_env_info(), 1, KEEP_AHEAD_SECONDS)
    except Exception as error:
        log.info("workers were not left for the next run: %s", error)


def supervisor_runtime_env(job_runtime_env: str) -> str:
    """The serialized runtime environment of the Ray job supervisor of a job submitted with
    the runtime environment this job has (`job_runtime_env`, serialized). Ray's job manager
    adds these variables to the submitted environment for the supervisor, which takes them
    out again for its driver; the supervisor's actor keeps Python's serialization, as the
    dashboard's own job has no runtime environment."""
    from ray._private import ray_constants
    from ray._private.accelerators.npu import NOSET_ASCEND_RT_VISIBLE_DEVICES_ENV_VAR
    from ray._private.accelerators.nvidia_gpu import NOSET_CUDA_VISIBLE_DEVICES_ENV_VAR
    from ray.runtime_env import RuntimeEnv

    submitted = json.loads(job_runtime_env or "{}")
    env_vars = {
        **(submitted.get("env_vars") or {}),
        ray_constants.RAY_WORKER_NICENESS: "0",
        NOSET_CUDA_VISIBLE_DEVICES_ENV_VAR: "1",
        NOSET_ASCEND_RT_VISIBLE_DEVICES_ENV_VAR: "1",
    }
    return str(RuntimeEnv(**{**submitted, "env_vars": env_vars}).serialize())


def write_ahead_note(note: Path, digest: str, until: float) -> None:
    temporary = note.with_suffix(f".{os.getpid()}")
    temporary.write_text(json.dumps({"runtime_env": digest, "until": until}))
    os.replace(temporary, note)


def take_ahead_note(note: Path, digest: str, now: float) -> bool:
    """Whether the run before left workers for this runtime environment that the raylet
    still keeps; the note is taken (removed) either way, so that one run counts on them,
    not two."""
    taken = note.with_suffix(f".taken.{os.getpid()}")
    try:
        os.rename(note, taken)  # atomic: of two runs starting at once, one gets it
    except FileNotFoundError:
        return False
    try:
        left = json.loads(taken.read_text())
        return bool(
            left.get("runtime_env") == digest
            and float(left.get("until", 0)) - AHEAD_MARGIN_SECONDS > now
        )
    except (ValueError, TypeError, AttributeError, OSError):
        return False
    finally:
        with contextlib.suppress(OSError):
            taken.unlink()


def _digest(runtime_env: Any) -> str:
    return hashlib.sha256(runtime_env.serialized_runtime_env.encode()).hexdigest()


def _trial_runtime_env_info() -> Any:
    """The RuntimeEnvInfo of this job's Tune trial actors (Ray's protobuf)."""
    return _job_runtime_env_info(
        lambda job: trial_runtime_env(job, tune_trial_env_vars(os.environ))
    )


def _supervisor_runtime_env_info() -> Any:
    """The RuntimeEnvInfo of the next job's supervisor, submitted as this one was."""
    return _job_runtime_env_info(supervisor_runtime_env)


def _job_runtime_env_info(serialized: Callable[[str], str]) -> Any:
    """This job's RuntimeEnvInfo (Ray's protobuf), its environment made `serialized(...)`."""
    import ray

    worker: Any = ray._private.worker.global_worker
    job_env = worker.core_worker.get_job_config().runtime_env_info
    info = type(job_env)()
    info.CopyFrom(job_env)
    info.serialized_runtime_env = serialized(job_env.serialized_runtime_env)
    return info


def _prestart(runtime_env: Any, count: int, keep_alive: int) -> int:
    """Asks this node's raylet for workers of no job; returns how many were asked for."""
    import grpc
    import ray

    # Ray's own internals (pinned in pyproject.toml; not typed for outside use).
    worker: Any = ray._private.worker.global_worker
    protos: Any = importlib.import_module("ray.core.generated.node_manager_pb2")
    stubs: Any = importlib.import_module("ray.core.generated.node_manager_pb2_grpc")
    common: Any = importlib.import_module("ray.core.generated.common_pb2")

    # Only this node's raylet is asked: trials that Ray places on other nodes start there.
    here = ray.get_runtime_context().get_node_id()
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    cpus = int(next((n["Resources"].get("CPU", 0) for n in nodes if n["NodeID"] == here), 0))
    count = min(count, cpus)
    if count < 1:
        return 0
    request = protos.PrestartWorkersRequest(
        language=common.PYTHON,
        runtime_env_info=runtime_env,
        keep_alive_duration_secs=keep_alive,
        num_workers=count,
    )
    address = f"{worker.node.node_ip_address}:{worker.node.node_manager_port}"
    with grpc.insecure_channel(address) as channel:
        stubs.NodeManagerServiceStub(channel).PrestartWorkers(
            request, timeout=PRESTART_TIMEOUT_SECONDS
        )
    return count
