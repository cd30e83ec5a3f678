"""A search survives its driver: `mlkube train` SIGKILLed mid-search, then the same
TrainingRun run again, finishes the search it left, with one parent run and every trial
logged once; a trial that had trained some epochs goes on from its last one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy.exc
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from mlkube.training import outcome

pytestmark = pytest.mark.integration

TRIALS, EPOCHS = 4, 6


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: no session Ray or Prefect API of the test run, a store of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(MLKUBE_HOME=str(tmp_path / "mlkube"), PREFECT_HOME=str(tmp_path / "prefect"))
    return env


def trial_runs(client: MlflowClient, parent: str) -> list[Any]:
    return client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        f"tags.`{outcome.TAG_PARENT_RUN}` = '{parent}'",
        run_view_type=ViewType.ACTIVE_ONLY,
    )


def steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, "loss"))


def mid_search_parent(client: MlflowClient) -> str | None:
    """The parent run, once two trials finished and a running one has logged two epochs."""
    experiment = client.get_experiment_by_name("digits")
    if experiment is None:
        return None
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`{outcome.TAG_ROLE}` = 'parent'"
    )
    for parent in parents:
        trials = trial_runs(client, parent.info.run_id)
        finished = [t for t in trials if t.info.status == "FINISHED"]
        running = [t for t in trials if t.info.status == "RUNNING"]
        if len(finished) >= 2 and any(len(steps(client, t.info.run_id)) >= 2 for t in running):
            return str(parent.info.run_id)
    return None


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def stop_mid_search(
    client: MlflowClient, child: subprocess.Popen[str]
) -> tuple[str, list[psutil.Process]]:
    """Looks at the store with the command's whole process tree stopped (driver, Ray,
    Prefect's API), so the search cannot run past the state being checked. Polled while
    running, a quiet machine once trained the last trials between two looks and the
    command ended unkilled. Returns the parent run's id and the tree, still stopped."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert child.poll() is None, "mlkube train ended before it could be killed"
        try:
            root = psutil.Process(child.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue  # ended: the next look says so
        signal_all(tree, signal.SIGSTOP)
        try:
            parent = mid_search_parent(client)
        except (MlflowException, sqlalchemy.exc.OperationalError):
            parent = None  # stopped inside a commit, the store stays locked: go on
        except BaseException:
            signal_all(tree, signal.SIGCONT)
            raise
        if parent is not None:
            return parent, tree
        signal_all(tree, signal.SIGCONT)
        time.sleep(0.2)
    raise AssertionError("the search did not get half way in 600 s")


def test_a_killed_search_resumes_when_the_same_trainingrun_runs_again(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "mlkube.io/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": "resumed"},
        "spec": {
            "task": "mnist", "model": {"name": "digits"},
            "tuning": {"numTrials": TRIALS, "maxConcurrentTrials": 2,
                       "searchSpace": {"epochs": {"choice": [EPOCHS]},
                                       "channels": {"choice": [8]}}},
        },
    }))  # fmt: skip
    command = [sys.executable, "-m", "mlkube", "train", "-f", str(manifest)]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlkube' / 'mlflow.db'}")

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        parent, tree = stop_mid_search(client, first)
        ours = tree[1:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        signal_all(ours, signal.SIGCONT)  # so that they see their driver gone
    finally:
        if first.poll() is None:
            first.kill()
    # Ray's processes die with the driver that started them; Prefect's temporary API
    # server does not: this test ends what its killed command left.
    _, alive = psutil.wait_procs(ours, timeout=30)
    for leftover in alive:
        print("left by the killed command:", leftover.pid, " ".join(leftover.cmdline()[:6]))
        leftover.kill()

    before = {t.info.run_id: t for t in trial_runs(client, parent)}
    done_before = {i for i, t in before.items() if t.info.status == "FINISHED"}
    started = {i: steps(client, i) for i, t in before.items() if t.info.status == "RUNNING"}
    assert len(done_before) >= 2 and any(len(s) >= 2 for s in started.values())
    assert client.get_run(parent).info.status == "RUNNING"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (
        f"resuming the search of mlflow run {parent}: {len(done_before)} of {TRIALS} trials done"
        in second.stderr
    ), second.stderr[-3000:]
    assert "Traceback" not in second.stderr

    # One parent run, finished, that says it was resumed once and counts every trial.
    experiment = client.get_experiment_by_name("digits").experiment_id
    parents = client.search_runs([experiment], f"tags.`{outcome.TAG_ROLE}` = 'parent'")
    assert [p.info.run_id for p in parents] == [parent]
    tags = parents[0].data.tags
    assert parents[0].info.status == "FINISHED"
    assert tags[outcome.TAG_RESUMED] == "1"
    assert tags[outcome.TAG_TRIALS_COMPLETED] == tags[outcome.TAG_TRIALS_TOTAL] == str(TRIALS)
    assert tags[outcome.TAG_MODEL_VERSION] == "1"

    after = {t.info.run_id: t for t in trial_runs(client, parent)}
    assert len(after) == TRIALS
    assert all(t.info.status == "FINISHED" for t in after.values())
    numbers = sorted(t.info.run_name for t in after.values())
    assert numbers == [f"trial-{n:03d}" for n in range(1, TRIALS + 1)]
    for run_id in done_before:
        # Kept as they were: not trained or logged again.
        assert run_id in after
        assert steps(client, run_id) == list(range(1, EPOCHS + 1))
        assert after[run_id].info.end_time == before[run_id].info.end_time
    for run_id, logged in started.items():
        # Went on in its own run from its last checkpoint: every epoch once, none again.
        assert run_id in after
        assert steps(client, run_id) == list(range(1, EPOCHS + 1)), (logged, run_id)
