"""The memory cache of loaded models: single-flight loads, sliding TTL, LRU memory budget.

Rules, all here and nowhere else:
- the first `use(key)` loads; concurrent first uses share that one load (single-flight);
- an entry idle for `ttl_seconds` is evicted (sliding: every use restarts the clock);
- when the bytes held exceed the budget, idle entries go least recently used first;
- an entry in use is never evicted, and a caller keeps its own reference, so eviction never
  breaks an in-flight request;
- a failed load is remembered: callers get the error at once until a backoff delay passes,
  then the next caller retries (1 s, 2 s, 4 s ... up to `max_backoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)
V = TypeVar("V")


class CacheObserver(Protocol):
    def hit(self, key: str) -> None: ...
    def miss(self, key: str) -> None: ...
    def loaded(self, key: str, seconds: float, size: int) -> None: ...
    def load_failed(self, key: str) -> None: ...
    def evicted(self, key: str, reason: str) -> None: ...
    def held(self, key: str, size: int) -> None: ...


class NullObserver:
    def hit(self, key: str) -> None: ...
    def miss(self, key: str) -> None: ...
    def loaded(self, key: str, seconds: float, size: int) -> None: ...
    def load_failed(self, key: str) -> None: ...
    def evicted(self, key: str, reason: str) -> None: ...
    def held(self, key: str, size: int) -> None: ...


class LoadFailed(Exception):
    """A recent load of `key` failed; retried after `retry_in` seconds."""

    def __init__(self, key: str, reason: str, retry_in: float) -> None:
        super().__init__(f"{reason} (retry in {retry_in:.1f} s)")
        self.key, self.reason, self.retry_in = key, reason, retry_in


@dataclass
class Entry(Generic[V]):
    value: V
    size: int
    last_used: float
    active: int = 0


@dataclass
class _Failure:
    error: BaseException
    attempts: int
    retry_at: float


@dataclass
class CachePolicy:
    ttl_seconds: float | None = 300.0  # None or 0: never expire
    budget_bytes: int | None = None  # None: no budget
    base_backoff: float = 1.0
    max_backoff: float = 30.0
    sweep_interval: float | None = None  # default: a quarter of the TTL, at most 5 s
    passthrough: tuple[type[BaseException], ...] = field(default_factory=tuple)

    def backoff(self, attempts: int) -> float:
        return min(self.base_backoff * 2.0 ** (attempts - 1), self.max_backoff)


Loader = Callable[[], Awaitable[tuple[V, int]]]


class ModelCache(Generic[V]):
    def __init__(
        self,
        policy: CachePolicy | None = None,
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or CachePolicy()
        self.observer: CacheObserver = observer or NullObserver()
        self._clock = clock
        self._entries: OrderedDict[str, Entry[V]] = OrderedDict()  # oldest use first
        self._loading: dict[str, asyncio.Future[Entry[V]]] = {}
        self._failures: dict[str, _Failure] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- reading ---------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def peek(self, key: str) -> V | None:
        entry = self._entries.get(key)
        return entry.value if entry else None

    @property
    def bytes_held(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    # -- using -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, key: str, load: Loader[V]) -> AsyncIterator[V]:
        """The loaded value for `key`, loading it if needed; pinned while the block runs."""
        entry = await self._acquire(key, load)
        try:
            yield entry.value
        finally:
            entry.active -= 1
            entry.last_used = self._clock()

    async def _acquire(self, key: str, load: Loader[V]) -> Entry[V]:
        self._ensure_sweeper()
        self.evict_expired()
        entry = self._entries.get(key)
        if entry is not None:
            self.observer.hit(key)
        else:
            self.observer.miss(key)
            entry = await self._load_once(key, load)
        entry.active += 1
        entry.last_used = self._clock()
        if key in self._entries:
            self._entries.move_to_end(key)
        return entry

    async def _load_once(self, key: str, load: Loader[V]) -> Entry[V]:
        future = self._loading.get(key)
        if future is None:
            failure = self._failures.get(key)
            now = self._clock()
            if failure is not None and now < failure.retry_at:
                if isinstance(failure.error, self.policy.passthrough):
                    raise failure.error
                raise LoadFailed(key, str(failure.error), failure.retry_at - now)
            future = asyncio.ensure_future(self._load(key, load))
            self._loading[key] = future
        # shield: a caller that gives up (client gone) must not cancel the others' load
        return await asyncio.shield(future)

    async def _load(self, key: str, load: Loader[V]) -> Entry[V]:
        started = time.perf_counter()
        try:
            value, size = await load()
        except Exception as error:
            failure = self._failures.get(key)
            attempts = failure.attempts + 1 if failure else 1
            delay = self.policy.backoff(attempts)
            self._failures[key] = _Failure(error, attempts, self._clock() + delay)
            self.observer.load_failed(key)
            log.warning(
                "loading %s failed (attempt %d, retry in %.1f s): %s", key, attempts, delay, error
            )
            if isinstance(error, self.policy.passthrough):
                raise
            raise LoadFailed(key, str(error), delay) from error
        finally:
            self._loading.pop(key, None)
        self._failures.pop(key, None)
        entry = Entry(value, size, self._clock())
        self._entries[key] = entry
        self.observer.loaded(key, time.perf_counter() - started, size)
        self.observer.held(key, size)
        self.enforce_budget(protect=key)
        return entry

    # -- evicting --------------------------------------------------------------------------
    def evict(self, key: str, reason: str) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.active > 0:
            return False
        del self._entries[key]
        self.observer.evicted(key, reason)
        self.observer.held(key, 0)
        log.info("evicted %s (%s)", key, reason)
        return True

    def evict_expired(self) -> list[str]:
        ttl = self.policy.ttl_seconds
        if not ttl:
            return []
        now = self._clock()
        expired = [
            key
            for key, entry in self._entries.items()
            if entry.active == 0 and now - entry.last_used >= ttl
        ]
        return [key for key in expired if self.evict(key, "ttl")]

    def enforce_budget(self, protect: str | None = None) -> list[str]:
        budget = self.policy.budget_bytes
        evicted: list[str] = []
        if budget is None:
            return evicted
        for key in list(self._entries):  # least recently used first
            if self.bytes_held <= budget:
                break
            if key != protect and self.evict(key, "memory"):
                evicted.append(key)
        if self.bytes_held > budget:
            log.warning(
                "models in use hold %d bytes, over the %d byte budget", self.bytes_held, budget
            )
        return evicted

    # -- background sweep ------------------------------------------------------------------
    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and self.policy.ttl_seconds:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        ttl = self.policy.ttl_seconds or 0
        interval = self.policy.sweep_interval or min(max(ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            self.evict_expired()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
