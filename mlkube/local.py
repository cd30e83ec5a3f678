"""Local mode: where things live on one machine, and the defaults that keep it offline."""

from __future__ import annotations

import gc
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

# Telemetry and phone-home switches of the stack, for this machine and for the pods the
# operator creates; set unless the user chose otherwise.
TELEMETRY_OFF_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # A cluster started with `ray start` (a RayJob's head) still posts a "usage stats are
    # disabled" report to Ray's server; this sends it nowhere.
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
# Only for a Ray started on this machine: a cluster's nodes must reach each other.
LOCAL_RAY_ENV = {
    # Keeps every Ray socket on 127.0.0.1 (otherwise Ray picks eth0 and listens on all).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray would otherwise write ~/.ray/auth_token on the first ray.init.
    "RAY_AUTH_MODE": "disabled",
}
OFFLINE_ENV = {**TELEMETRY_OFF_ENV, **LOCAL_RAY_ENV}

# Ray's dashboard reads this file before it looks at RAY_USAGE_STATS_ENABLED; when the
# file is missing it probes cloud metadata addresses (169.254.169.254 and
# metadata.google.internal). Ray's cluster launcher writes it on head nodes; we do the same
# for the Ray we start ourselves.
RAY_BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"


# Prefect gives its temporary local server 20 s to start; two busy cores need more.
PREFECT_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def apply_env_defaults() -> None:
    """Sets the defaults above wherever the user has not set the variable."""
    for key, value in {**OFFLINE_ENV, **PREFECT_ENV}.items():
        os.environ.setdefault(key, value)


def mlkube_home() -> Path:
    return Path(os.environ.get("MLKUBE_HOME") or Path.home() / ".mlkube")


def local_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store under the mlkube home."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = mlkube_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def is_local_store(tracking_uri: str) -> bool:
    """A tracking URI of files on this machine (sqlite, file, a path), not a server."""
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def local_artifact_root() -> str:
    return str(mlkube_home() / "mlartifacts")


def ensure_ray_bootstrap_config() -> Path:
    """Write `{}` to ~/ray_bootstrap_config.yaml unless it exists (see RAY_BOOTSTRAP_CONFIG)."""
    path = Path.home() / RAY_BOOTSTRAP_CONFIG
    if not path.exists():
        path.write_text("{}\n")
    return path


def free_port() -> int:
    """A loopback TCP port that is free now (the kernel picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def exit_process(code: int) -> NoReturn:
    """Ends a command. The interpreter's last garbage collection would walk every object
    torch, MLflow, Ray and Prefect loaded (about 2.5 s after a training run) for nothing."""
    gc.freeze()
    sys.exit(code)
