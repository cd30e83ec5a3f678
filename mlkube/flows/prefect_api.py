"""Prefect's temporary local API, started early: it takes about 7 s to come up here."""

from __future__ import annotations

import threading

from mlkube.background import BackgroundStart

_api_start: BackgroundStart | None = None
_api_start_lock = threading.Lock()


def _start_temporary_api() -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    # The same condition under which Prefect starts it for the first flow run.
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().start()


def start_prefect_api() -> None:
    """Starts Prefect's temporary API while the caller loads data; wait_for_prefect_api()
    must come before the first flow run (Prefect's start() is not safe across threads)."""
    global _api_start
    with _api_start_lock:
        if _api_start is None:
            _api_start = BackgroundStart("mlkube-prefect-api-start", _start_temporary_api)


def wait_for_prefect_api() -> None:
    with _api_start_lock:
        starting = _api_start
    if starting is not None:
        starting.wait()
