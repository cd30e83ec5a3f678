"""Trial workers started ahead (mlkube.training.trial_workers): a driver that asks for them
as it connects gets its first trials run in them, not in workers started for the trials.
Run for a job with a runtime environment of its own (a RayJob's runtimeEnvYAML, given the
way Ray's job submission gives it) and for one without (`mlkube train` on one machine):
the raylet uses a started worker only when the texts of the two runtime environments match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlkube.operator.rayjob import runtime_env_yaml
from mlkube.training.trial_workers import supervisor_runtime_env, trial_runtime_env

pytestmark = pytest.mark.integration

DRIVER = """
import json, subprocess, sys, time
import psutil
from ray import tune
from mlkube.training.tune import ensure_ray, start_ray

def now():
    # A process's start time as psutil reads it (boot time + ticks) is off from time.time()
    # by up to a second here: compare with a process started now, on the same clock.
    marker = subprocess.Popen(["sleep", "60"])
    created = psutil.Process(marker.pid).create_time()
    marker.kill()
    return created

def idle_trial_workers():
    # Ray workers idle with the environment of Tune's trial actors (its PL_DISABLE_FORK).
    found = 0
    for process in psutil.process_iter():
        try:
            idle = process.cmdline()[:1] == ["ray::IDLE"]
            found += idle and process.environ().get("PL_DISABLE_FORK") == "1"
        except (psutil.Error, IndexError):
            pass
    return found

driver_started = now()
start_ray(trial_workers=2, trial_modules=["sklearn.ensemble"])
ensure_ray()
# The flow's own setup, while the workers start (on a loaded machine, until they are up).
deadline = time.monotonic() + 60
while idle_trial_workers() < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
tuner_created = now()

def trainable(config):
    tune.report({"worker_created": psutil.Process().create_time(),
                 "imported_ahead": "sklearn.ensemble" in sys.modules})

results = tune.Tuner(
    trainable,
    param_space={"n": tune.grid_search([1, 2])},
    run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0),
).fit()
print(json.dumps({"driver_started": driver_started, "tuner_created": tuner_created,
                  "workers_created": [r.metrics["worker_created"] for r in results],
                  "imported_ahead": [r.metrics["imported_ahead"] for r in results]}))
"""

# A run ending on a warm cluster, which leaves the next run's trial workers.
LEAVING_DRIVER = """
from mlkube.training.trial_workers import leave_trial_workers, set_up_trial_imports
from mlkube.training.tune import ensure_ray

set_up_trial_imports(["sklearn.ensemble"])
ensure_ray()
leave_trial_workers(2)
"""

# What Ray's job submission gives the driver of a RayJob the operator made.
JOB_CONFIG = {"runtime_env": yaml.safe_load(runtime_env_yaml("http://mlflow:5000/"))}


@pytest.mark.parametrize("job_env", ["runtimeEnvYAML", "none"])
def test_first_trials_run_in_workers_started_as_the_driver_connected(
    ray_local: None, tmp_path: Path, job_env: str
) -> None:
    seen = run_driver(DRIVER, tmp_path, job_env)
    # Both trials ran in processes that were up before Tune asked for any, and that had
    # imported the task's modules as they started (Ray's worker setup hook).
    assert len(seen["workers_created"]) == 2
    assert all(t < seen["tuner_created"] for t in seen["workers_created"]), seen
    assert seen["imported_ahead"] == [True, True]


def test_a_run_takes_the_trial_workers_the_run_before_left(ray_local: None, tmp_path: Path) -> None:
    """On a warm cluster: the workers a run left as it ended are the next run's, and that
    run starts none of its own (it takes the note the first left in the head's /tmp)."""
    run_driver(LEAVING_DRIVER, tmp_path, "runtimeEnvYAML")
    note = tmp_path / "mlkube-trial-workers-ahead.json"
    assert note.is_file()

    seen = run_driver(DRIVER, tmp_path, "runtimeEnvYAML")

    assert len(seen["workers_created"]) == 2
    assert all(t < seen["driver_started"] for t in seen["workers_created"]), seen
    assert seen["imported_ahead"] == [True, True]
    assert not note.exists()


def run_driver(source: str, tmp_path: Path, job_env: str) -> dict[str, Any]:
    """Runs a driver script as a job of the session's Ray (with a RayJob's runtime env, or
    none); its last line of output, as JSON. Its temporary directory is tmp_path."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "TMPDIR": str(tmp_path)}  # fmt: skip
    if job_env == "runtimeEnvYAML":
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(JOB_CONFIG)
    script = tmp_path / "driver.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tune")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = (done.stdout.strip().splitlines() or ["{}"])[-1]
    return dict(json.loads(last))


def test_a_trial_worker_whose_module_is_missing_still_takes_trials(
    ray_local: None, tmp_path: Path
) -> None:
    """The setup hook never ends a worker: a trial that needs the module fails by itself."""
    seen = run_driver(DRIVER.replace('"sklearn.ensemble"]', '"no_such_module_here"]'), tmp_path,
                      "none")  # fmt: skip
    assert len(seen["workers_created"]) == 2


TRIAL_IMPORTS = """
import json, os, sys
from mlkube.training.tasks import resolve_task
from mlkube.training.trial_workers import TRIAL_MODULES_ENV, import_trial_modules

task = resolve_task("insurance")
os.environ[TRIAL_MODULES_ENV] = ",".join(task.trial_modules)
import_trial_modules()
data = task.load(sys.argv[1], None, 0)
before = set(sys.modules)
task.train({"max_iter": 50}, data, report=lambda *args, **kwargs: None, seed=0)
print(json.dumps(sorted(m for m in set(sys.modules) - before
                        if m.split(".")[0] in ("sklearn", "scipy", "pandas", "ray"))))
"""


def test_a_worker_set_up_for_tabular_trials_imports_nothing_more_to_train_one(
    insurance_csv: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRIAL_IMPORTS, str(insurance_csv)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_a_trials_runtime_environment_lays_tunes_variables_over_the_jobs() -> None:
    job = json.dumps({"env_vars": {"B": "job", "A": "job"}, "config": {"setup_timeout_seconds": 5}})
    assert trial_runtime_env(job, {"A": "tune", "C": "tune"}) == (
        '{"config":{"setup_timeout_seconds":5},"env_vars":{"A":"tune","B":"job","C":"tune"}}'
    )
    assert trial_runtime_env("{}", {"PL_DISABLE_FORK": "1"}) == (
        '{"env_vars": {"PL_DISABLE_FORK": "1"}}'
    )


def test_the_next_supervisors_runtime_environment_is_the_one_rays_job_manager_gives_it() -> None:
    """A RayJob's runtime env as its driver sees it, made into its supervisor's, is the text
    Ray's job manager gives the supervisor actor of a job submitted with it: the raylet
    hands the worker left for it only to an actor of the same text."""
    from ray.dashboard.modules.job.job_manager import JobManager
    from ray.runtime_env import RuntimeEnv

    submitted = JOB_CONFIG["runtime_env"]
    manager: Any = JobManager  # its method reads no state of the manager for these arguments
    given = manager._get_supervisor_runtime_env(None, dict(submitted), "job-1", False)

    assert supervisor_runtime_env(json.dumps(submitted)) == RuntimeEnv(**given).serialize()
