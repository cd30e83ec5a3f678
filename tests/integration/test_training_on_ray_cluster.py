"""The RayJob entrypoint on an existing Ray cluster: RAY_ADDRESS is honoured."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mlkube.local import ensure_ray_bootstrap_config, free_port
from tests.fixtures.mlflow_server import stop_process_group
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A Ray head started the way KubeRay starts one (`ray start --head`), on loopback.

    Stopped through its own process group: `ray stop` would end every Ray on the machine,
    the session's own included (and with it this test process, a driver of that Ray)."""
    # Without ~/ray_bootstrap_config.yaml the head's dashboard probes cloud metadata
    # addresses (tests/integration/test_offline.py); heads under KubeRay know they run on
    # Kubernetes instead (and probe too). Seen here with tests/integration/test_zygote.py.
    ensure_ray_bootstrap_config()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-ext-"))
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [
            ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_listening(port, head)
        wait_until_ready(ray, f"127.0.0.1:{port}", head)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_process_group(head, grace=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not listen on {port} in {timeout:.0f} s")


def wait_until_ready(ray: str, address: str, process: subprocess.Popen[bytes]) -> None:
    """Until the head's node is up, as KubeRay waits for the head pod to be ready: the GCS
    listens first, and a driver that connects before the raylet registered fails (seen on a
    loaded machine: "Failed to connect to Ray cluster")."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        status = subprocess.run(
            [ray, "status", f"--address={address}"], capture_output=True, text=True, timeout=120
        )
        if status.returncode == 0 and " node_" in status.stdout:  # an Active node
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray head at {address} had no node up in 180 s")


def insurance_run_file(folder: Path, csv: Path, model_name: str, trials: int = 2) -> Path:
    """The insurance example as a TrainingRun file, on this CSV and model, with few trials."""
    document = yaml.safe_load((REPO / "examples/insurance/trainingrun.yaml").read_text())
    document["spec"]["dataset"]["uri"] = str(csv)
    document["spec"]["model"]["name"] = model_name
    document["spec"]["tuning"]["numTrials"] = trials
    spec_file = folder / "run.yaml"
    spec_file.write_text(yaml.safe_dump(document))
    return spec_file


def test_entrypoint_trains_on_the_cluster_ray_address_names(
    ray_cluster: tuple[str, Path], insurance_csv: Path, model_name: str, tmp_path: Path
) -> None:
    address, temp_dir = ray_cluster
    spec_file = insurance_run_file(tmp_path, insurance_csv, model_name)

    completed = subprocess.run(
        [sys.executable, "-m", "mlkube.flows.train", "--spec-file", str(spec_file)],
        env={**os.environ, "RAY_ADDRESS": address, "PREFECT_LOGGING_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert '"version":1' in completed.stdout and '"promoted":true' in completed.stdout
    # The driver ran as a job of that cluster, not of a Ray of its own.
    drivers = list(temp_dir.glob("session_*/logs/python-core-driver-*"))
    assert drivers, f"no driver joined the cluster in {temp_dir}"
    from mlkube.local import local_tracking_uri

    version = MlflowClient(local_tracking_uri()).get_model_version_by_alias(model_name, "champion")
    assert int(version.version) == 1
