"""Fixtures of the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import pytest
from kopf._core.engines import posting


@pytest.fixture
def events() -> Iterator[Callable[[], list[Any]]]:
    """kopf's event queue, as a running operator has it; returns the posted events."""
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    tokens = [
        (posting.settings_var, posting.settings_var.set(kopf.OperatorSettings())),
        (posting.event_queue_var, posting.event_queue_var.set(queue)),
        (posting.event_queue_loop_var, posting.event_queue_loop_var.set(loop)),
    ]

    def posted() -> list[Any]:
        loop.run_until_complete(asyncio.sleep(0))
        found = []
        while not queue.empty():
            found.append(queue.get_nowait())
        return found

    yield posted
    for var, token in reversed(tokens):
        var.reset(token)  # type: ignore[attr-defined]
    loop.close()
