"""Periodic status syncs without finalizers.

kopf's per-object timers put a finalizer on every object they run for (kopf/on.py:
`requires_finalizer=True`, no option), so with the operator uninstalled or scaled to 0,
`kubectl delete` of a TrainingRun or ModelDeployment, and the deletion of its namespace,
hang until someone removes the finalizer by hand. One operator-wide loop does the same
work instead: every interval it syncs each object an index lists, in the executor kopf's
sync handlers use. An object deleted meanwhile simply drops out of the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Generic, TypeVar

LOG = logging.getLogger("mlkube.operator.poller")
Key = TypeVar("Key", bound=Hashable)


class Poller(Generic[Key]):
    """Calls `sync(key)` for every key `keys()` lists, every `interval` seconds; the keys of
    one round run side by side, and a round ends before the next interval starts."""

    def __init__(
        self, name: str, interval: float, keys: Callable[[], Iterable[Key]],
        sync: Callable[[Key], None],
    ) -> None:  # fmt: skip
        self.name, self.interval, self.keys, self.sync = name, interval, keys, sync
        self._task: asyncio.Task[None] | None = None

    def _sync_one(self, key: Key) -> None:
        try:
            self.sync(key)
        except Exception:  # one object's failure must not stop the others' syncs
            LOG.exception("%s: sync of %s failed; next attempt in %gs", self.name, key,
                          self.interval)  # fmt: skip

    async def run(self, executor: Executor | None = None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Listed on the event loop, where kopf updates its indexes.
            keys = list(self.keys())
            await asyncio.gather(
                *(loop.run_in_executor(executor, self._sync_one, key) for key in keys)
            )
            await asyncio.sleep(self.interval)

    def start(self, executor: Executor | None = None) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(executor), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class KeyedLocks:
    """One lock per object, so that a change handler and the poller never write one
    object's status at the same time."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def forget_all_but(self, keep: Iterable[Hashable]) -> None:
        kept = set(keep)
        with self._guard:
            for key in [k for k in self._locks if k not in kept]:
                del self._locks[key]
