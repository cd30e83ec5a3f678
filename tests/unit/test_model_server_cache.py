"""The memory cache: single-flight, sliding TTL, LRU budget, pins and failure backoff."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mlkube.model_servers.cache import CachePolicy, LoadFailed, ModelCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def hit(self, key: str) -> None:
        self.events.append(("hit", key))

    def miss(self, key: str) -> None:
        self.events.append(("miss", key))

    def loaded(self, key: str, seconds: float, size: int) -> None:
        self.events.append(("loaded", key))

    def load_failed(self, key: str) -> None:
        self.events.append(("failed", key))

    def evicted(self, key: str, reason: str) -> None:
        self.events.append(("evicted", key, reason))

    def held(self, key: str, size: int) -> None:
        pass


def loader(value: Any, size: int = 10, calls: list[str] | None = None, delay: float = 0.0):
    async def load() -> tuple[Any, int]:
        if calls is not None:
            calls.append(value)
        await asyncio.sleep(delay)
        return value, size

    return load


def make(**policy: Any) -> tuple[ModelCache[Any], Clock, Recorder]:
    clock, recorder = Clock(), Recorder()
    policy.setdefault("sweep_interval", 3600)  # tests drive eviction themselves
    return ModelCache(CachePolicy(**policy), recorder, clock), clock, recorder


def test_concurrent_first_uses_share_one_load() -> None:
    cache, _, recorder = make(ttl_seconds=60)
    calls: list[str] = []

    async def use() -> str:
        async with cache.use("m", loader("model", calls=calls, delay=0.05)) as value:
            return value

    async def main() -> list[str]:
        results = await asyncio.gather(*(use() for _ in range(20)))
        await cache.close()
        return results

    assert asyncio.run(main()) == ["model"] * 20
    assert calls == ["model"]
    assert recorder.events.count(("loaded", "m")) == 1


def test_sliding_ttl_evicts_idle_models_and_next_use_reloads() -> None:
    cache, clock, recorder = make(ttl_seconds=10)
    calls: list[str] = []

    async def main() -> None:
        async with cache.use("m", loader("v1", calls=calls)):
            pass
        clock.now += 8
        async with cache.use("m", loader("v1", calls=calls)):
            pass  # a hit restarts the clock
        clock.now += 8
        assert cache.evict_expired() == []
        clock.now += 3
        assert cache.evict_expired() == ["m"]
        async with cache.use("m", loader("v2", calls=calls)) as value:
            assert value == "v2"
        await cache.close()

    asyncio.run(main())
    assert calls == ["v1", "v2"]
    assert ("evicted", "m", "ttl") in recorder.events


def test_a_model_in_use_is_never_evicted() -> None:
    cache, clock, _ = make(ttl_seconds=1, budget_bytes=5)

    async def main() -> None:
        async with cache.use("m", loader("v")) as value:
            clock.now += 100
            assert cache.evict_expired() == []
            assert cache.enforce_budget() == []
            assert value == "v" and "m" in cache
        assert cache.evict_expired() == []  # just used: the TTL restarts at release
        clock.now += 2
        assert cache.evict_expired() == ["m"]
        await cache.close()

    asyncio.run(main())


def test_budget_evicts_least_recently_used_first() -> None:
    cache, clock, recorder = make(ttl_seconds=None, budget_bytes=25)

    async def use(key: str) -> None:
        clock.now += 1
        async with cache.use(key, loader(key, size=10)):
            pass

    async def main() -> None:
        await use("a")
        await use("b")
        await use("a")  # b is now the least recently used
        await use("c")
        assert sorted(cache.keys()) == ["a", "c"]
        assert cache.bytes_held == 20

    asyncio.run(main())
    assert ("evicted", "b", "memory") in recorder.events


def test_failed_load_backs_off_then_retries() -> None:
    cache, clock, recorder = make(ttl_seconds=60, base_backoff=2, max_backoff=8)
    attempts: list[int] = []

    async def failing() -> tuple[Any, int]:
        attempts.append(1)
        raise FileNotFoundError("no MLmodel in the artifacts")

    async def main() -> None:
        for _ in range(2):  # the second call is answered from the backoff
            with pytest.raises(LoadFailed, match="no MLmodel"):
                async with cache.use("m", failing):
                    pass
        assert len(attempts) == 1
        clock.now += 2.5
        with pytest.raises(LoadFailed, match=r"retry in 4\.0 s"):
            async with cache.use("m", failing):
                pass
        assert len(attempts) == 2
        clock.now += 4.5
        async with cache.use("m", loader("ok")) as value:
            assert value == "ok"
        await cache.close()

    asyncio.run(main())
    assert recorder.events.count(("failed", "m")) == 2


def test_passthrough_errors_keep_their_type() -> None:
    cache, _, _ = make(ttl_seconds=60, passthrough=(LookupError,))

    async def missing() -> tuple[Any, int]:
        raise LookupError("no such model")

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(LookupError, match="no such model"):
                async with cache.use("m", missing):
                    pass
        await cache.close()

    asyncio.run(main())


def test_the_sweeper_evicts_without_requests() -> None:
    cache: ModelCache[Any] = ModelCache(CachePolicy(ttl_seconds=0.05, sweep_interval=0.01))

    async def main() -> None:
        async with cache.use("m", loader("v")):
            pass
        for _ in range(500):
            if "m" not in cache:
                break
            await asyncio.sleep(0.01)
        assert "m" not in cache
        await cache.close()

    asyncio.run(main())
