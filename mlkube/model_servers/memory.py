"""How much resident memory a model load added: what the memory budget counts.

The measure is the growth of the process's resident set (RSS) across the load, with loads
one at a time (a lock) so that two loads never count each other's memory. Before each of
the two readings the garbage collector runs and glibc's `malloc_trim(0)` hands freed pages
back to the kernel, so that:
- what the load allocated and freed again (the file read, a pickle's buffers) is not counted;
- a model loaded where an evicted one lived is counted in full (without the trim, reused
  free heap would not grow the RSS at all).
What it cannot exclude is memory that requests of other, already loaded models allocate
in other threads during the load; that noise is the size of one request's working memory.
A size is never below zero (the loader counts at least one page per loaded model). Where
/proc/self/statm is missing (not Linux) there is no RSS to read and the caller falls back
to the bytes on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (musl, macOS: nothing to trim with)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def resident_bytes() -> int | None:
    """This process's resident set in bytes, or None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def settle() -> None:
    """Free what is garbage and return free heap pages to the kernel."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class Growth:
    """The resident bytes a measured block added: None when RSS cannot be read."""

    bytes: int | None = None


class ResidentMeter:
    """Measures blocks one at a time: `with meter.measure() as growth: load()`."""

    def __init__(self, read: Callable[[], int | None] = resident_bytes) -> None:
        self._read = read
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def measure(self) -> Iterator[Growth]:
        growth = Growth()
        with self._lock:
            settle()
            before = self._read()
            yield growth
            settle()
            after = self._read()
        if before is not None and after is not None:
            growth.bytes = max(0, after - before)
