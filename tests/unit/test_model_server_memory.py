"""The resident-memory measure the memory budget counts (memory.ResidentMeter)."""

from __future__ import annotations

import threading

import numpy as np

from mlkube.model_servers.memory import ResidentMeter, resident_bytes

MIB = 2**20


def test_kept_memory_counts_and_freed_memory_does_not() -> None:
    meter = ResidentMeter()
    kept: list[np.ndarray] = []
    with meter.measure() as growth:
        kept.append(np.ones(64 * MIB // 8))  # 64 MiB touched and kept
    assert growth.bytes is not None
    assert 60 * MIB <= growth.bytes <= 80 * MIB
    with meter.measure() as transient:
        scratch = np.ones(64 * MIB // 8)
        del scratch  # allocated and freed inside the load: not the model's
    assert transient.bytes is not None and transient.bytes < 8 * MIB


def _chunks(count: int) -> list[bytes]:
    """Heap (not mmap) allocations of 2000 bytes each, every page touched."""
    return [bytes([i % 251]) * 2000 for i in range(count)]


def test_memory_freed_by_an_eviction_and_reused_counts_in_full() -> None:
    """An evicted model leaves holes in the heap (what it shared pins them); a model loaded
    into them would not grow the RSS at all unless the free pages went back to the kernel
    (measured without the trim: about 1 MiB for these 61 MiB)."""
    meter = ResidentMeter()
    evicted = _chunks(32_000)
    pinned = evicted[::64]
    del evicted
    with meter.measure() as growth:
        kept = _chunks(32_000)  # about 61 MiB
    assert growth.bytes is not None and growth.bytes >= 55 * MIB
    assert len(kept) + len(pinned) > 0


def test_never_below_zero_and_none_without_rss() -> None:
    readings = iter([500 * MIB, 100 * MIB])
    with ResidentMeter(lambda: next(readings)).measure() as shrank:
        pass
    assert shrank.bytes == 0
    with ResidentMeter(lambda: None).measure() as unknown:
        pass
    assert unknown.bytes is None
    assert resident_bytes() is not None  # Linux: the real reading


def test_measurements_are_one_at_a_time() -> None:
    meter = ResidentMeter()
    inside, overlaps = [0], []
    lock = threading.Lock()

    def load() -> None:
        with meter.measure():
            with lock:
                inside[0] += 1
                overlaps.append(inside[0])
            threading.Event().wait(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]
