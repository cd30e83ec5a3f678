"""The pre-imported train flow of warm clusters (mlkube.flows.zygote), as real processes:
a zygote serving a light stand-in module (tests.integration.zygote_target), clients run as
a RayJob would run its entrypoint, and what they show on their stdout, stderr and exit code
against the same command run plainly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mlkube.operator.rayjob import ZYGOTE_PRELOAD
from tests.integration.test_training_on_ray_cluster import (
    insurance_run_file,
    ray_cluster,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TARGET = "tests.integration.zygote_target"
FALLBACK_LINE = "mlkube.flows.zygote: no pre-imported"


def environment(**extra: str) -> dict[str, str]:
    # The session's PYTHONPATH has the repository (for the stand-in) and the network guard.
    return {**os.environ, "ZYGOTE_TEST_VALUE": "from-client", **extra}


class Zygote:
    def __init__(self, module: str, *preload: str, env: dict[str, str] | None = None) -> None:
        # A short path: a Unix socket's name has at most 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="zy-", dir="/tmp"))
        self.socket = str(self.root / "private" / "z.sock")
        command = [sys.executable, "-m", "mlkube.flows.zygote", "serve", "--socket", self.socket]
        command += [arg for name in preload for arg in ("--preload", name)]
        self.process = subprocess.Popen(
            [*command, module],
            cwd=REPO,
            env=env or environment(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # it listens once it printed this
        assert "serving on" in line, line

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    started = Zygote(TARGET)
    yield started
    started.stop()


def client_command(socket_path: str, *args: str, module: str = TARGET) -> list[str]:
    return [sys.executable, "-m", "mlkube.flows.zygote", "run", "--socket", socket_path,
            module, *args]  # fmt: skip


def run_client(
    socket_path: str, *args: str, module: str = TARGET, **options: Any
) -> subprocess.CompletedProcess[str]:
    options.setdefault("env", environment())
    options.setdefault("cwd", REPO)
    options.setdefault("timeout", 120)
    command = client_command(socket_path, *args, module=module)
    return subprocess.run(command, capture_output=True, text=True, **options)


def started_child(client: subprocess.Popen[str]) -> dict[str, Any]:
    assert client.stdout is not None
    return dict(json.loads(client.stdout.readline()))


def gone(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_a_run_through_the_zygote_is_the_plain_run_in_a_forked_child(
    zygote: Zygote, tmp_path: Path
) -> None:
    done = run_client(zygote.socket, "echo", "3", "an argument", input="hello\n", cwd=tmp_path)

    assert done.returncode == 3, done.stderr
    seen = json.loads(done.stdout)
    assert seen["imported_in"] == zygote.process.pid != seen["pid"]
    assert seen["argv"] == ["echo", "3", "an argument"]
    assert seen["stdin"] == "hello"
    assert seen["cwd"] == str(tmp_path)
    assert seen["env"] == "from-client"
    assert done.stderr == "to stderr\n"


def test_a_second_run_is_a_fresh_process(zygote: Zygote) -> None:
    first = json.loads(run_client(zygote.socket, "echo", "0", input="").stdout)
    second = json.loads(run_client(zygote.socket, "echo", "0", input="").stdout)

    assert first["pid"] != second["pid"]
    assert first["imported_in"] == second["imported_in"] == zygote.process.pid
    assert first["runs_seen"] == second["runs_seen"] == 1  # the first run's state stayed its own
    assert psutil.Process(zygote.process.pid).children() == []  # reaped, no zombies


def test_an_exception_ends_the_run_as_python_would(zygote: Zygote) -> None:
    through = run_client(zygote.socket, "raise")
    plain = subprocess.run(
        [sys.executable, "-m", TARGET, "raise"], capture_output=True, text=True,
        env=environment(), cwd=REPO, timeout=60,
    )  # fmt: skip

    assert through.returncode == plain.returncode == 1
    assert through.stderr.startswith("Traceback (most recent call last):")
    assert through.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    assert through.stderr.splitlines()[-1] == "RuntimeError: boom from the stand-in"


@pytest.mark.parametrize(("mode", "returncode"), [("", -signal.SIGTERM), ("exit-on-term", 15)])
def test_sigterm_to_the_client_reaches_the_child(
    zygote: Zygote, mode: str, returncode: int
) -> None:
    client = subprocess.Popen(
        client_command(zygote.socket, "sleep", *([mode] if mode else [])),
        stdout=subprocess.PIPE, text=True, env=environment(), cwd=REPO,
    )  # fmt: skip
    child = started_child(client)
    assert child["pgid"] == child["pid"]  # a group of its own, signalled as one

    client.send_signal(signal.SIGTERM)

    assert client.wait(timeout=30) == returncode  # the child's end, as the client's
    assert gone(child["pid"], within=0)  # reaped before the client was told


def test_a_client_killed_takes_its_run_with_it(zygote: Zygote) -> None:
    client = subprocess.Popen(
        client_command(zygote.socket, "sleep"), stdout=subprocess.PIPE, text=True,
        env=environment(), cwd=REPO,
    )  # fmt: skip
    child = started_child(client)
    # another run meanwhile: the zygote serves while runs go on
    assert run_client(zygote.socket, "echo", "5", input="").returncode == 5

    client.kill()  # as Ray kills a job that did not stop on SIGTERM
    client.wait(timeout=30)

    assert gone(child["pid"])
    assert psutil.Process(zygote.process.pid).children() == []


def test_without_a_zygote_the_client_runs_the_module_itself(tmp_path: Path) -> None:
    done = run_client(str(tmp_path / "nothing.sock"), "echo", "4", input="hi\n")

    assert done.returncode == 4
    seen = json.loads(done.stdout)
    assert seen["imported_in"] == seen["pid"]  # imported by its own process
    assert seen["stdin"] == "hi"
    first, rest = done.stderr.split("\n", 1)
    assert first.startswith(FALLBACK_LINE) and "nothing.sock" in first
    assert rest == "to stderr\n"


def test_a_run_whose_import_time_environment_differs_runs_plainly(zygote: Zygote) -> None:
    env = environment(PREFECT_API_URL="http://127.0.0.1:9/api")
    done = run_client(zygote.socket, "echo", "0", input="", env=env)

    assert done.returncode == 0
    seen = json.loads(done.stdout)
    assert seen["imported_in"] == seen["pid"]
    assert "PREFECT_API_URL differs" in done.stderr.splitlines()[0]


def test_a_run_gets_the_openmp_threads_its_environment_asks_for_as_a_plain_run_does() -> None:
    """The zygote loads OpenMP (with scikit-learn) before any run's OMP_NUM_THREADS is known;
    Ray's job supervisor gives its entrypoint 1."""
    assert (os.cpu_count() or 1) > 1, "one core: every run has one thread anyway"
    quiet = {k: v for k, v in environment().items() if k != "OMP_NUM_THREADS"}
    started = Zygote(TARGET, "sklearn.ensemble", env=quiet)
    try:
        for asked in ({"OMP_NUM_THREADS": "1"}, {}):
            env = {**quiet, **asked}
            through = run_client(started.socket, "threads", env=env)
            plain = subprocess.run(
                [sys.executable, "-m", TARGET, "threads"], env=env, cwd=REPO,
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert FALLBACK_LINE not in through.stderr
            assert json.loads(through.stdout) == json.loads(plain.stdout), asked
    finally:
        started.stop()
    assert json.loads(plain.stdout) != [1]  # unasked, a run uses more than one


def test_the_socket_directory_is_private(zygote: Zygote) -> None:
    mode = os.stat(Path(zygote.socket).parent).st_mode
    assert stat.S_IMODE(mode) == 0o700


# --- the train flow itself -------------------------------------------------------------------

TRAIN = "mlkube.flows.train"


@pytest.fixture
def train_zygote() -> Iterator[Zygote]:
    started = Zygote(TRAIN, *ZYGOTE_PRELOAD, env=environment(PREFECT_LOGGING_LEVEL="WARNING"))
    yield started
    started.stop()


PRELOAD_COVERAGE = """
import json, sys
import mlkube.training.preload
before = set(sys.modules)
from mlkube.training.tasks import resolve_task
from skops.io import dumps, get_untrusted_types
task = resolve_task("insurance")
data = task.load(sys.argv[1], None, 0)
model = task.fit({"max_iter": 20}, data, 0)
task.score(model, *data.holdout)
get_untrusted_types(data=dumps(model))
print(json.dumps(sorted(m for m in set(sys.modules) - before
                        if m.split(".")[0] in ("sklearn", "skops", "scipy"))))
"""


def test_after_the_warm_preload_a_tabular_run_imports_no_more_of_scikit_learn(
    insurance_csv: Path,
) -> None:
    """What the driver of a tabular run imports (its data's split, its pipeline, the refit,
    the scores, the model's skops check) is in mlkube.training.preload."""
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD_COVERAGE, str(insurance_csv)], capture_output=True,
        text=True, env=environment(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_the_train_flow_refuses_bad_input_through_its_zygote_as_it_does_plainly(
    train_zygote: Zygote,
) -> None:
    bad = ["--spec-json", "{"]
    env = environment(PREFECT_LOGGING_LEVEL="WARNING")
    through = run_client(train_zygote.socket, *bad, module=TRAIN, env=env)
    plain = subprocess.run(
        [sys.executable, "-m", TRAIN, *bad], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=120,
    )  # fmt: skip

    assert through.returncode == plain.returncode == 2
    assert through.stderr == plain.stderr
    assert through.stderr.startswith("error: --spec-json: malformed JSON")


def test_the_train_flow_trains_through_its_zygote_on_a_ray_cluster(
    train_zygote: Zygote,
    ray_cluster: tuple[str, Path],  # noqa: F811 (the fixture imported above)
    insurance_csv: Path,
    model_name: str,
    tmp_path: Path,
) -> None:
    """As a warm head runs a RayJob: the client is the entrypoint, RAY_ADDRESS names the
    cluster; the forked child connects to it, trains, registers and promotes."""
    address, temp_dir = ray_cluster
    spec_file = insurance_run_file(tmp_path, insurance_csv, model_name)
    env = environment(PREFECT_LOGGING_LEVEL="WARNING", RAY_ADDRESS=address)

    done = run_client(
        train_zygote.socket, "--spec-file", str(spec_file), module=TRAIN, env=env, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert FALLBACK_LINE not in done.stderr  # the zygote's child ran it
    assert '"version":1' in done.stdout and '"promoted":true' in done.stdout
    assert list(temp_dir.glob("session_*/logs/python-core-driver-*")), "no driver on the cluster"
