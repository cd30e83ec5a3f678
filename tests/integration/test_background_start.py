"""Ray and Prefect's temporary API start in the background, as `mlkube train` starts them:
they work, stay up while needed, and leave no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.integration.processes import survivors

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

START_IN_THE_BACKGROUND = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import psutil, ray
    from mlkube.training.tune import ensure_ray, start_ray
    start_ray(num_cpus=1)
    started_on = [t.name for t in threading.enumerate()]
    ensure_ray()
    # Ray's processes die with the thread that started them unless it stays alive.
    time.sleep(2)

    @ray.remote
    def worker_pid():
        return os.getpid()

    pid = ray.get(worker_pid.remote(), timeout=60)
    children = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"worker": pid, "children": children, "threads": started_on}))
    """
)


def test_ray_started_in_the_background_runs_tasks_and_leaves_nothing_behind() -> None:
    done = subprocess.run(
        [sys.executable, "-c", START_IN_THE_BACKGROUND],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "mlkube-ray-start" in report["threads"]
    assert report["worker"] in report["children"]
    # Ray's own warning about a driver started off the main thread is not shown.
    assert "SIGTERM handler" not in done.stderr
    assert not survivors(report["children"]), "Ray processes left after exit"


AWAIT_A_FAILED_START = textwrap.dedent(
    """
    from mlkube.training.tune import ensure_ray, start_ray
    start_ray()
    print("start_ray returned", flush=True)
    try:
        ensure_ray()
    except ValueError as error:
        print(f"ensure_ray raised: {error}", flush=True)
    """
)


def test_a_failed_background_start_is_raised_where_ray_is_awaited() -> None:
    """A RAY_ADDRESS that Ray cannot parse fails the start at once (no cluster is asked)."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:no-port"}
    done = subprocess.run(
        [sys.executable, "-c", AWAIT_A_FAILED_START],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "start_ray returned"
    assert lines[1].startswith("ensure_ray raised: ") and "no-port" in lines[1]


def test_sigterm_ends_a_flow_whose_ray_started_in_the_background(tmp_path: Path) -> None:
    """Ray sets this handler only when started on the main thread; start_ray sets it."""
    code = textwrap.dedent(
        """
        import signal, sys, time
        from mlkube.training.tune import ensure_ray, start_ray
        start_ray(num_cpus=1)
        ensure_ray()
        print("ready", flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    descendants = [p.pid for p in psutil.Process(child.pid).children(recursive=True)]
    child.terminate()
    assert child.wait(timeout=60) == 15
    assert not survivors(descendants), "Ray processes left after SIGTERM"
