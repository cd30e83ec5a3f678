"""Session-wide settings: offline defaults, a private HOME, and the network guard."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
NETGUARD = Path(__file__).resolve().parent / "netguard"

pytest_plugins = [
    name
    for name in [
        "tests.fixtures.mlflow_server",
        "tests.fixtures.http_server",
        "tests.fixtures.services",
    ]
    if (REPO / (name.replace(".", "/") + ".py")).exists()
]

# Read before HOME moves: the Kubernetes binaries are cached under the real home.
os.environ.setdefault("MLKUBE_K8S_CACHE", str(Path.home() / ".cache" / "mlkube"))

# A private HOME and MLKUBE_HOME for the whole session, so that nothing the stack writes
# (~/.mlkube, ~/.ray, ~/.config/mlflow, ~/.prefect, ray_bootstrap_config.yaml) touches the
# user's own, and so that tests start from nothing.
_session_root = Path(tempfile.mkdtemp(prefix="mlkube-tests-"))
os.environ["HOME"] = str(_session_root / "home")
os.environ["MLKUBE_HOME"] = str(_session_root / "mlkube-home")
os.environ["PREFECT_HOME"] = str(_session_root / "prefect")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
Path(os.environ["HOME"]).mkdir(parents=True)

from mlkube.local import OFFLINE_ENV  # noqa: E402
from tests.cluster.addresses import LOCAL_NETWORKS  # noqa: E402

os.environ.update(OFFLINE_ENV)

# Every Python process started from here on loads the guard through sitecustomize.
NETGUARD_LOG = _session_root / "netguard.log"
os.environ["MLKUBE_NETGUARD_LOG"] = str(NETGUARD_LOG)
# The real test node's bridge and Service ranges are on this machine (tests/cluster/node.py).
os.environ["MLKUBE_NETGUARD_ALLOW"] = ",".join(LOCAL_NETWORKS)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(NETGUARD), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
)
sys.path.insert(0, str(NETGUARD))
import sitecustomize  # noqa: E402

if getattr(sitecustomize, "LOG_ENV", None) != "MLKUBE_NETGUARD_LOG":
    # Another sitecustomize came first on sys.path: load ours by path.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_netguard", NETGUARD / "sitecustomize.py")
    assert spec and spec.loader
    sitecustomize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sitecustomize)
    sitecustomize.install()


def netguard_violations() -> list[str]:
    if not NETGUARD_LOG.exists():
        return []
    return [line for line in NETGUARD_LOG.read_text().splitlines() if line.strip()]


@pytest.fixture
def new_violations() -> Callable[[], list[str]]:
    """Returns the guard's records made since this test started."""
    already = len(netguard_violations())
    return lambda: netguard_violations()[already:]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    violations = netguard_violations()
    if violations:
        print("\nnetguard: connections beyond loopback were attempted:", file=sys.stderr)
        for line in violations:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the shared data and CRDs live beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def insurance_csv(shared_dir: Path) -> Path:
    return shared_dir / "data" / "insurance.csv"
