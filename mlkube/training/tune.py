"""The Ray Tune driver: runs a task's search and tells an observer about every trial."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from mlkube.api.errors import CommandFailed
from mlkube.background import BackgroundStart
from mlkube.local import ensure_ray_bootstrap_config, mlkube_home
from mlkube.training.search_space import to_tune
from mlkube.training.tasks.base import Mode, SearchSpace, Task, TaskData

# Tune's default loggers import torch and TensorBoard in the driver (about 1.7 s) and write
# files nobody reads here: trials are recorded in MLflow by the observer instead.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Tune's newer console output prints its banner even when told to be silent; the
# progress of a search is shown by mlkube's own observer.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@dataclass(frozen=True)
class SearchSettings:
    num_trials: int
    max_concurrent_trials: int
    metric: str
    mode: Mode
    scheduler: Literal["fifo", "asha"]
    search_space: SearchSpace
    timeout_seconds: int | None
    seed: int
    max_epochs: int = 1


class TrialObserver(Protocol):
    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None: ...
    def trial_result(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None: ...
    def trial_ended(self, trial_id: str, error: str | None) -> None: ...


def ray_temp_dir() -> str:
    # Ray's socket paths must stay under 107 bytes: keep its folder short.
    return os.path.join(tempfile.gettempdir(), f"mlkube-ray-{os.getuid()}")


# Ray gives its local node a fixed 30 s to register; on a machine this busy a second or
# third try usually gets through, and a user is better served by a wait than a traceback.
RAY_START_ATTEMPTS = 3
RAY_START_TIMED_OUT = "timed out during startup"


class RayDidNotStart(CommandFailed):
    """Ray's local node did not come up; one line saying what to do."""


def _init_ray(num_cpus: int | None) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    ensure_ray_bootstrap_config()
    for _ in range(RAY_START_ATTEMPTS):
        try:
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=ray_temp_dir(),
                object_store_memory=512 * 1024 * 1024,
                configure_logging=False,
            )
            return
        except Exception as error:
            if RAY_START_TIMED_OUT not in str(error):
                raise
            ray.shutdown()
    raise RayDidNotStart(ray_start_advice(RAY_START_ATTEMPTS, os.getloadavg()[0]))


def ray_start_advice(attempts: int, load: float) -> str:
    return (
        f"Ray's local node did not start in {attempts} tries of 30 s; the machine is busy "
        f"(load {load:.1f} on {os.cpu_count()} cores). Try again when it is quieter, or start "
        "Ray once with `ray start --head` and set RAY_ADDRESS=auto"
    )


class _NotMainThreadWarning(logging.Filter):
    """Drops Ray's warning that a driver started off the main thread sets no SIGTERM handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_ray_start: BackgroundStart | None = None
_ray_start_lock = threading.Lock()


def start_ray(num_cpus: int | None = None) -> None:
    """Begins what ensure_ray() does without waiting, so Ray's start (about 5 s) overlaps
    other work; ensure_ray() then waits for it."""
    global _ray_start
    import ray

    with _ray_start_lock:
        if _ray_start is not None or ray.is_initialized():
            return
        if threading.current_thread() is threading.main_thread():
            # Ray installs this handler itself only when started on the main thread.
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        logging.getLogger("ray._private.worker").addFilter(_NotMainThreadWarning())
        _ray_start = BackgroundStart(
            "mlkube-ray-start", lambda: _init_ray(num_cpus), keep_thread=True
        )


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS's cluster (inside a RayJob) or start a local Ray on loopback."""
    global _ray_start
    import ray

    with _ray_start_lock:
        starting, _ray_start = _ray_start, None
    if starting is not None:
        starting.wait()
    if not ray.is_initialized():
        _init_ray(num_cpus)


def _run_trial(config: dict[str, Any], task: Task, data: TaskData, seed: int) -> None:
    from ray import tune
    from threadpoolctl import threadpool_limits

    # Trials run side by side on few cores: one thread each is faster than fighting.
    with threadpool_limits(1):
        task.train(config, data, report=tune.report, seed=seed)


def _observer_callback(observer: TrialObserver) -> Any:
    from ray.tune import Callback

    class ObserverCallback(Callback):
        def on_trial_start(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            observer.trial_started(trial.trial_id, trial.config)

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
        ) -> None:
            metrics = {
                k: float(result[k])
                for k in trial_metric_keys(result)
                if isinstance(result[k], int | float) and not isinstance(result[k], bool)
            }
            observer.trial_result(trial.trial_id, metrics, int(result.get("training_iteration", 1)))

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            observer.trial_ended(trial.trial_id, None)

        def on_trial_error(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            observer.trial_ended(trial.trial_id, _trial_error(trial))

    return ObserverCallback()


# Keys Tune adds to every result; everything else is the task's own metrics.
_TUNE_KEYS = {
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid",
    "time_since_restore", "iterations_since_restore", "done", "trial_id", "date",
    "hostname", "node_ip", "checkpoint_dir_name", "should_checkpoint",
}  # fmt: skip


def trial_metric_keys(result: Mapping[str, Any]) -> set[str]:
    return {k for k in result if k not in _TUNE_KEYS and "/" not in k}


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1][:500]
    return "trial failed"


def run_search(
    task: Task, data: TaskData, settings: SearchSettings, observer: TrialObserver
) -> None:
    """Runs every trial; what each did is told to the observer as it happens."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    ensure_ray()
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(settings.max_epochs, 1),
            grace_period=1,
            reduction_factor=2,
        )
        if settings.scheduler == "asha"
        else FIFOScheduler()
    )
    storage = mlkube_home() / "ray_results"
    storage.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        tune.with_parameters(_run_trial, task=task, data=data, seed=settings.seed),
        param_space=to_tune(settings.search_space),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            num_samples=settings.num_trials,
            search_alg=BasicVariantGenerator(
                random_state=settings.seed, max_concurrent=settings.max_concurrent_trials
            ),
            scheduler=scheduler,
            time_budget_s=settings.timeout_seconds,
            # A new process per trial costs about 1.9 s of imports; reuse them.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            storage_path=str(storage),
            verbose=0,
            # The JSON logger alone keeps ResultGrid's metrics without the other loggers' cost.
            callbacks=[_observer_callback(observer), JsonLoggerCallback()],
            log_to_file=False,
        ),
    )
    tuner.fit()
