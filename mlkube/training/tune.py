"""The Ray Tune driver: runs a task's search and tells an observer about every trial."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlkube.api.errors import CommandFailed, UserError
from mlkube.background import BackgroundStart
from mlkube.local import ensure_ray_bootstrap_config, mlkube_home
from mlkube.training.search_space import grid_to_tune, to_tune
from mlkube.training.tasks.base import Mode, SearchSpace, Task, TaskData
from mlkube.training.trial_workers import prestart_trial_workers, set_up_trial_imports

if TYPE_CHECKING:  # the module imports Ray: only when a search runs
    from mlkube.training.tune_events import TrialObserver

# Tune's default loggers import torch and TensorBoard in the driver (about 1.7 s) and write
# files nobody reads here: trials are recorded in MLflow by the observer instead.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Tune's newer console output prints its banner even when told to be silent; the
# progress of a search is shown by mlkube's own observer.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


# On a cluster: where the volume that keeps searches' state is mounted (operator/rayjob.py
# sets it from spec.tuning.storage).
TUNE_STORAGE_ENV = "MLKUBE_TUNE_STORAGE"
# Tune writes a search's state every 10 s or more by default; a driver killed in between
# loses what happened since. Once a second costs a few milliseconds for small searches.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Tune warns on stderr, for every trial checkpoint, when its state is written more often
# than every 5 s; here that is on purpose (above), and cheap.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@dataclass(frozen=True)
class SearchSettings:
    num_trials: int
    max_concurrent_trials: int
    metric: str
    mode: Mode
    scheduler: Literal["fifo", "asha", "hyperband"]
    search_space: SearchSpace
    timeout_seconds: int | None
    seed: int
    max_epochs: int = 1
    algorithm: Literal["random", "grid", "tpe"] = "random"
    # The points of algorithm grid (num_trials is then their number).
    grid: dict[str, list[Any]] | None = None
    gpus_per_trial: float = 0
    # Checkpoint the task's state at every report (see Task.checkpoints).
    keep_state: bool = False


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


class _GoneCheckpointError(logging.Filter):
    """Drops Tune's traceback for a checkpoint it wanted to prune that is gone already: the
    attempt whose driver died pruned it after Tune last saved its state (ray 2.60 looks the
    path up before its guarded delete). The bookkeeping is done by then; nothing is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        gone = isinstance(error, FileNotFoundError)
        return not (gone and "Error handling checkpoint" in str(record.msg))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the process as an exit, so that Ray shuts down and Prefect and MLflow
    record how the run ended. Ray's failure-signal handler saw the signal first and set an
    alarm that aborts the process (SIGABRT, exit -6) if it still lives a few seconds later:
    cancelled, because an exit on a busy machine takes longer (4 of 6 exits aborted at
    load 8)."""
    signal.alarm(0)
    sys.exit(signum)


_ray_start: BackgroundStart | None = None
_ray_start_lock = threading.Lock()


def start_ray(
    num_cpus: int | None = None, trial_workers: int = 0, trial_modules: Sequence[str] = ()
) -> None:
    """Begins what ensure_ray() does without waiting, so Ray's start (about 5 s) overlaps
    other work; ensure_ray() then waits for it. Once connected, `trial_workers` worker
    processes for the search's first trials start too, and import `trial_modules` as they
    start (mlkube.training.trial_workers)."""
    global _ray_start
    import ray

    with _ray_start_lock:
        if _ray_start is not None or ray.is_initialized():
            return
        if threading.current_thread() is threading.main_thread():
            # Ray installs this handler itself only when started on the main thread.
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        logging.getLogger("ray._private.worker").addFilter(_NotMainThreadWarning())

        if trial_workers > 0:
            set_up_trial_imports(trial_modules)

        def start() -> None:
            _init_ray(num_cpus)
            prestart_trial_workers(trial_workers)

        _ray_start = BackgroundStart("mlkube-ray-start", start, keep_thread=True)


def first_trial_workers(settings: SearchSettings) -> int:
    """How many trials start at once, each in a worker of its own (GPU trials are left to
    Ray: their workers are set up for the device they get)."""
    if settings.gpus_per_trial > 0:
        return 0
    return min(settings.max_concurrent_trials, settings.num_trials)


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


def experiment_dir(key: str) -> Path:
    """Where Tune keeps the state of one TrainingRun's search: $MLKUBE_TUNE_STORAGE (a
    volume that outlives the Ray head, on a cluster) or MLKUBE_HOME/tune, then the key."""
    root = Path(os.environ.get(TUNE_STORAGE_ENV) or mlkube_home() / "tune")
    return root / re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


@contextmanager
def search_lock(experiment: Path) -> Iterator[None]:
    """Held while a search of this TrainingRun runs in this process: a second `mlkube
    train` of the same TrainingRun must not take the first one's search for a dead one."""
    experiment.parent.mkdir(parents=True, exist_ok=True)
    with open(experiment.parent / f"{experiment.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchBusy(
                f"another train flow of this TrainingRun is running (it holds {lock.name})"
            ) from None
        except OSError:
            pass  # a file system without locks (some network volumes): KubeRay runs one
        yield


class SearchBusy(CommandFailed):
    """The same TrainingRun is being trained by another process."""


def can_resume(path: Path) -> bool:
    from ray import tune

    return path.is_dir() and bool(tune.Tuner.can_restore(str(path)))


def _search_algorithm(settings: SearchSettings) -> Any:
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if settings.algorithm == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        # OptunaSearch seeds its TPE sampler with `seed`.
        return ConcurrencyLimiter(
            OptunaSearch(metric=settings.metric, mode=settings.mode, seed=settings.seed),
            max_concurrent=settings.max_concurrent_trials,
        )
    return BasicVariantGenerator(
        random_state=settings.seed, max_concurrent=settings.max_concurrent_trials
    )


# Hyperband's brackets: the first stops trials from their first epoch on, the last never.
HYPERBAND_BRACKETS = 3


def _scheduler(settings: SearchSettings) -> Any:
    """asha: successive halving from the first epoch, keeping the best half at each rung.
    hyperband: its asynchronous form (Li et al., the ASHA paper), which spreads trials over
    brackets that start halving later and later, keeping a third at each rung. Tune's
    synchronous HyperBandScheduler pauses trials until their bracket catches up; with
    trials limited to maxConcurrentTrials it stalled here (ray 2.60) once paused trials held
    every slot."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    budget = max(settings.max_epochs, 1)
    if settings.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration", max_t=budget, grace_period=1, reduction_factor=2
        )
    if settings.scheduler == "hyperband":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=budget,
            grace_period=1,
            reduction_factor=3,
            brackets=HYPERBAND_BRACKETS,
        )
    return FIFOScheduler()


def _param_space(settings: SearchSettings) -> dict[str, Any]:
    if settings.grid is not None:
        return grid_to_tune(settings.grid)
    return to_tune(settings.search_space)


def _state_where_it_can_be_kept(settings: SearchSettings) -> SearchSettings:
    """Trial checkpoints of a Ray cluster with workers must go to storage every pod shares
    (Tune refuses a path on the head's own disk). Without it, trials keep no state."""
    import ray

    everyone: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    nodes = sum(1 for node in everyone if node.get("Alive"))
    if not settings.keep_state or os.environ.get(TUNE_STORAGE_ENV) or nodes <= 1:
        return settings
    return dataclasses.replace(settings, keep_state=False)


def _check_gpus(settings: SearchSettings) -> None:
    import ray

    if settings.gpus_per_trial <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
    if have < settings.gpus_per_trial:
        raise UserError(
            f"spec.resources.gpu: each trial asks for {settings.gpus_per_trial:g} GPU, and "
            f"the Ray cluster has {have:g}"
        )


def run_search(
    task: Task,
    data: TaskData,
    settings: SearchSettings,
    observer: TrialObserver,
    experiment: Path,
    finished: Mapping[str, Mapping[str, float]] | None = None,
) -> set[str]:
    """Runs every trial; what each did is told to the observer as it happens. Tune keeps
    the search's state in `experiment`; when `finished` is given (the results an earlier
    attempt recorded) and that state can be restored, the search goes on from it: trials
    that finished are not run again, and the others go on from their last checkpoint.
    Returns the ids of the trials Tune ran or restored."""
    from ray import tune

    from mlkube.training import tune_events

    ensure_ray()
    _check_gpus(settings)
    settings = _state_where_it_can_be_kept(settings)
    trainable: Any = tune.with_parameters(
        tune_events.run_trial, task=task, data=data, seed=settings.seed,
        keep_state=settings.keep_state, finished=dict(finished or {}),
    )  # fmt: skip
    if settings.gpus_per_trial > 0:
        trainable = tune.with_resources(trainable, {"cpu": 1, "gpu": settings.gpus_per_trial})
    tune_events.observe(observer)
    try:
        if finished is not None and can_resume(experiment):
            logging.getLogger("ray.tune.execution.tune_controller").addFilter(
                _GoneCheckpointError()
            )
            tuner = tune.Tuner.restore(
                str(experiment), trainable, resume_unfinished=True, resume_errored=False,
                param_space=_param_space(settings),
            )  # fmt: skip
        else:
            shutil.rmtree(experiment, ignore_errors=True)
            experiment.parent.mkdir(parents=True, exist_ok=True)
            tuner = _new_tuner(trainable, settings, experiment)
        results = tuner.fit()
        last = [results[i].metrics or {} for i in range(len(results))]
        return {str(m["trial_id"]) for m in last if m.get("trial_id")}
    finally:
        tune_events.observe(None)


def _new_tuner(trainable: Any, settings: SearchSettings, experiment: Path) -> Any:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from mlkube.training import tune_events

    return tune.Tuner(
        trainable,
        param_space=_param_space(settings),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            # A grid is run once, whole.
            num_samples=1 if settings.grid is not None else settings.num_trials,
            search_alg=_search_algorithm(settings),
            scheduler=_scheduler(settings),
            time_budget_s=settings.timeout_seconds,
            # A new process per trial costs about 1.9 s of imports; reuse them.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(experiment.parent),
            verbose=0,
            # The JSON logger alone keeps ResultGrid's metrics without the other loggers' cost.
            callbacks=[tune_events.ObserverCallback(), JsonLoggerCallback()],
            log_to_file=False,
            # The last state of each trial is all a resumed or unpaused trial needs (Tune
            # writes its own state at once whenever a trial has made this many).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
