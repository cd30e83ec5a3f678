"""The guard that fails the session on any connection beyond loopback really catches one."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def run_guarded(code: str, log: Path) -> str:
    """Runs code in a fresh interpreter whose guard writes to its own log."""
    env = {**os.environ, "MLKUBE_NETGUARD_LOG": str(log)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout


@pytest.mark.parametrize(
    ("code", "recorded"),
    [
        ("socket.socket().connect(('169.254.169.254', 80))", "connect 169.254.169.254:80"),
        ("socket.getaddrinfo('metadata.google.internal', 80)", "metadata.google.internal"),
    ],
)
def test_guard_refuses_and_records_what_leaves_loopback(
    code: str, recorded: str, tmp_path: Path
) -> None:
    log = tmp_path / "guard.log"
    out = run_guarded(
        f"import socket\ntry:\n    {code}\nexcept OSError as e:\n    print('refused:', e)\n", log
    )
    assert "refused:" in out and "netguard" in out
    assert recorded in log.read_text()


def test_loopback_is_allowed(new_violations: Callable[[], list[str]]) -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=1):
            pass
    assert new_violations() == []
