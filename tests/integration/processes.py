"""What a command started, and whether any of it outlived the command."""

from __future__ import annotations

import subprocess
import time

import psutil


def watch_descendants(child: subprocess.Popen[str], timeout: float) -> dict[int, set[str]]:
    """Every process `child` started while it ran, with every command line each showed (one
    seen between fork and exec still shows its parent's); waits for `child` to end."""
    seen: dict[int, set[str]] = {}
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        try:
            for process in psutil.Process(child.pid).children(recursive=True):
                seen.setdefault(process.pid, set()).add(" ".join(process.cmdline()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    child.wait(timeout=10)
    return seen


def survivors(pids: list[int], grace: float = 30) -> list[int]:
    """Which of these processes are still running once `grace` seconds have passed."""
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)
