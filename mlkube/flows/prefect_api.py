"""Prefect's temporary local API, started early: it takes about 7 s to come up here."""

from __future__ import annotations

import os
import threading

from mlkube.api.errors import UserError, first_line
from mlkube.background import BackgroundStart


class PrefectUnavailable(UserError):
    """Prefect's temporary API did not come up; the message is one line for the user."""


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
    if starting is None:
        return
    try:
        starting.wait()
    except RuntimeError as error:  # Prefect's message carries the server's whole output
        home = os.environ.get("PREFECT_HOME", "~/.prefect")
        raise PrefectUnavailable(
            f"Prefect's temporary API did not start (PREFECT_HOME {home}): {first_line(error)}"
        ) from None
