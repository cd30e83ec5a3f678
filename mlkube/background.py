"""Slow start-ups (Ray, Prefect's temporary API) that run while the caller does other work."""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundStart:
    """Runs `start` on a thread of its own; wait() returns once it is done, or raises what
    it raised, in the waiting thread."""

    def __init__(self, name: str, start: Callable[[], None], keep_thread: bool = False) -> None:
        self._start = start
        # Ray's processes are started with a parent-death signal, which the kernel ties to
        # the starting thread: they would die with it, so its thread must stay.
        self._keep_thread = keep_thread
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._start()
        except BaseException as error:  # handed to the thread that waits
            self._error = error
        finally:
            self._done.set()
        if self._keep_thread:
            threading.Event().wait()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error
