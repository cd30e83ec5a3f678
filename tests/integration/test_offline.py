"""Nothing leaves loopback: Ray's cloud-metadata probe is stopped, telemetry is off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from mlkube.local import OFFLINE_ENV, RAY_BOOTSTRAP_CONFIG

pytestmark = pytest.mark.integration

START_RAY_AND_WAIT_FOR_PROBE = textwrap.dedent(
    """
    import os, sys, tempfile, time
    sys.path.insert(0, {repo!r})
    import ray
    from mlkube.local import apply_env_defaults, ensure_ray_bootstrap_config
    apply_env_defaults()
    if sys.argv[1] == "local-mode":
        ensure_ray_bootstrap_config()
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=temp_dir)
    # The dashboard logs this line right after it read (or probed for) the cluster config.
    dashboard_log = os.path.join(temp_dir, "session_latest", "logs", "dashboard.log")
    deadline = time.time() + 90
    while time.time() < deadline:
        if os.path.exists(dashboard_log) and "Usage reporting is" in open(dashboard_log).read():
            break
        time.sleep(0.2)
    else:
        sys.exit("the dashboard never reached its usage-stats module")
    ray.shutdown()
    """
)


def start_ray_in(home: Path, mode: str, log: Path) -> None:
    code = START_RAY_AND_WAIT_FOR_PROBE.format(repo=str(Path(__file__).resolve().parents[2]))
    env = {**os.environ, "HOME": str(home), "MLKUBE_NETGUARD_LOG": str(log)}
    subprocess.run([sys.executable, "-c", code, mode], env=env, check=True, timeout=180)


def test_ray_probes_cloud_metadata_without_the_bootstrap_file(tmp_path: Path) -> None:
    """The guard sees Ray's real probe: proof that the next test can fail."""
    log = tmp_path / "guard.log"
    start_ray_in(tmp_path, "bare", log)
    recorded = log.read_text()
    assert "169.254.169.254" in recorded or "metadata.google.internal" in recorded


def test_local_mode_ray_makes_no_connection_beyond_loopback(
    ray_local: None, new_violations: Callable[[], list[str]], tmp_path: Path
) -> None:
    # The session's Ray was started the local-mode way: the file is in its HOME ...
    assert (Path.home() / RAY_BOOTSTRAP_CONFIG).read_text().strip() == "{}"
    # ... and a fresh one started the same way tries nothing.
    log = tmp_path / "guard.log"
    start_ray_in(tmp_path, "local-mode", log)
    assert not log.exists() or log.read_text() == ""
    assert new_violations() == []


def test_telemetry_is_off_by_default_for_every_process() -> None:
    names = list(OFFLINE_ENV)
    code = f"import mlkube, os, json; print(json.dumps({{k: os.environ[k] for k in {names!r}}}))"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    import json

    values = json.loads(out)
    assert values["RAY_USAGE_STATS_ENABLED"] == "0"
    assert values["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert values["DO_NOT_TRACK"] == "1"
    assert values["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
