"""Micro-batching: concurrent requests for one model become one predict() call.

Batching is only switched on for a model whose predictions do not depend on the batch: BLAS
takes other code paths for one row than for many, so a linear model or a neural network can
differ in the last bit between a 1-row call and the same row inside a batch.
`judge_batching` decides at load time (`Trust`): on the model's input example when it has one;
otherwise on rows made from its signature, and then the first live batches are checked too
(on PROBATION, each batch is also predicted row by row and the row-by-row answers are the
ones returned, so no answer ever depends on the batch). A model whose signature gives no
usable rows (string columns) is judged on live batches alone.

A request that arrives alone (no other request for the model in flight) at an idle model
whose predict is fast (under `inline_below` seconds, measured) is predicted right on the
event loop: at concurrency 1 two thread hand-offs
cost more than the predict blocks the loop, and on a busy machine each hand-off waits for a
time slice. Before going inline it yields once, so requests that arrived with it queue up and
are batched off the loop instead.

While a predict runs (in a worker thread, off the event loop), new requests queue up; the
next round takes all of them, up to `max_rows`. One request alone is predicted at once, so
latency at concurrency 1 pays only the thread hop. A round waits briefly only where requests
are known to be on their way (`_linger`): clients answered by the last round send their next
requests right after, and without the wait a round took the first few and left the rest for
another predict of about the same cost. gRPC calls (`one_by_one`) wait longer: grpc.aio hands
them to Python one at a time, each after a round trip through grpc's poller thread and the
event loop, so the requests the last round answered come back a millisecond or more apart (more
while a predict holds the GIL); with REST's wait a round took half of them, the other half
came while it ran, and the two halves then alternated, every predict paying the model's fixed
cost for half a batch. The model sees rows in the same dtypes whether batched or not, and a
batch whose predict fails, or whose output cannot be cut back per request, is retried request
by request, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from mlkube.model_servers.codec import Codec, Rows, normalize_output, split_output

log = logging.getLogger(__name__)

BatchObserver = Callable[[int, int], None]  # (requests, rows) of each predict call
PROBATION_BATCHES = 8  # live batches checked row by row before batching is trusted
LINGER_GAP = 0.001  # a round stops waiting once no request came for this long
LINGER_MAX = 0.005  # and never waits longer than this or one predict, whichever is shorter
# gRPC calls: up to 5 ms between arrivals and 15 ms a round, not bounded by one predict's
# time (a round that is cut short splits the clients into halves that stay split)
ONE_BY_ONE_GAP = 0.005
ONE_BY_ONE_MAX = 0.015


class Trust(enum.Enum):
    ON = "on"  # checked on the model's own input example, or on live batches
    OFF = "off"  # predictions depend on the batch, or the codec cannot batch
    PROBATION = "probation"  # batch, but check each batch row by row until trusted


class MicroBatcher:
    def __init__(
        self,
        predict: Callable[[Any], Any],
        codec: Codec,
        max_rows: int = 256,
        on_batch: BatchObserver | None = None,
        trust: Trust = Trust.ON,
        inline_below: float = 0.005,
        on_verdict: Callable[[Trust], None] | None = None,
        linger_gap: float = LINGER_GAP,
        linger_max: float = LINGER_MAX,
        one_by_one_gap: float = ONE_BY_ONE_GAP,
        one_by_one_max: float = ONE_BY_ONE_MAX,
    ) -> None:
        self.trust = trust if codec.batchable else Trust.OFF
        self.on_verdict = on_verdict  # told when probation ends, ON or OFF
        self._checked_batches = 0
        self.inline_below = inline_below
        self.predict_seconds: float | None = None  # moving average of one predict call
        self._probing = False
        self._predict = predict
        self._codec = codec
        self._max_rows = max_rows
        self._on_batch = on_batch
        self._queue: deque[tuple[Rows, asyncio.Future[Any]]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._last_round = 1  # requests the last round answered: they come back first
        self._arrival: asyncio.Future[bool] | None = None  # what a lingering round awaits
        self._linger_gap, self._linger_max = linger_gap, linger_max
        self._one_by_one_gap, self._one_by_one_max = one_by_one_gap, one_by_one_max
        self._one_by_one = False  # the last request came over gRPC

    async def submit(self, rows: Rows, alone: bool = True, one_by_one: bool = False) -> Any:
        """This request's share of the model output (an array or a DataFrame). `alone`: no
        other request for this model is in flight (being read or decoded). `one_by_one`: a
        gRPC call; gRPC hands calls over one at a time, so one in flight says nothing about
        the calls behind it. Only a request alone, and not over gRPC, may be predicted on the
        event loop: predicting each gRPC call on the loop as it came kept the batcher
        idle-looking and every batch one request long."""
        self._one_by_one = one_by_one
        if alone and not one_by_one and self._idle() and self._fast() and not self._probing:
            self._probing = True
            try:
                await asyncio.sleep(0)  # others that arrived with us reach the queue meanwhile
            finally:
                self._probing = False
            if self._idle():
                return self._inline(rows)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((rows, future))
        if self._arrival is not None:
            _settle(self._arrival, True)  # a lingering round counts it
        if self._worker is None:
            self._worker = loop.create_task(self._drain())
        return await future

    async def _linger(self, expected: int) -> None:
        """Wait while requests known to be on their way still arrive. `expected`: those the
        last round answered (closed-loop clients send the next one as soon as they have their
        answer) and those that came while it ran. A round waits for that many, as long as
        each came within `linger_gap` of the one before, and for at most one predict's time
        (`linger_max` at most): a longer wait costs more than the second predict it saves.
        gRPC calls wait `one_by_one_gap` and `one_by_one_max` instead (see the module's doc).
        After a round of one request with nothing queued meanwhile, no round waits."""
        if self.trust is Trust.OFF or self.predict_seconds is None:
            return
        loop = asyncio.get_running_loop()
        if self._one_by_one:
            gap, longest = self._one_by_one_gap, self._one_by_one_max
        else:
            gap, longest = self._linger_gap, min(self.predict_seconds, self._linger_max)
        deadline = time.monotonic() + longest
        while len(self._queue) < expected and self._queued_rows() < self._max_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            arrival: asyncio.Future[bool] = loop.create_future()
            self._arrival = arrival
            timer = loop.call_later(min(gap, remaining), _settle, arrival, False)
            try:
                came = await arrival
            finally:
                timer.cancel()
                self._arrival = None
            if not came:
                return  # nothing came: the others are not on their way

    def _queued_rows(self) -> int:
        return sum(rows.n for rows, _ in self._queue)

    def _idle(self) -> bool:
        return self._worker is None and not self._queue

    def _fast(self) -> bool:
        return self.predict_seconds is not None and self.predict_seconds < self.inline_below

    def _inline(self, rows: Rows) -> Any:
        self._last_round = 1
        if self._on_batch:
            self._on_batch(1, rows.n)
        return normalize_output(self._call([rows]))

    def _take(self) -> list[tuple[Rows, asyncio.Future[Any]]]:
        first = self._queue.popleft()
        batch = [first]
        if self.trust is Trust.OFF:
            return batch
        key, rows = self._codec.batch_key(first[0]), first[0].n
        while self._queue and rows + self._queue[0][0].n <= self._max_rows:
            if self._codec.batch_key(self._queue[0][0]) != key:
                break  # different optional columns: next round
            item = self._queue.popleft()
            batch.append(item)
            rows += item[0].n
        return batch

    async def _drain(self) -> None:
        try:
            arrived = 0  # requests that came while the last round ran
            while self._queue:
                await self._linger(self._last_round + arrived)
                taken = self._take()
                self._last_round = len(taken)
                batch = [item for item in taken if not item[1].cancelled()]
                if not batch:
                    continue
                try:
                    await self._run(batch)
                except Exception as error:  # a bug here must fail requests, never hang them
                    log.exception("micro-batching failed")
                    for _, future in batch:
                        _settle(future, error=error)
                arrived = len(self._queue)
        finally:
            self._worker = None

    async def _run(self, batch: list[tuple[Rows, asyncio.Future[Any]]]) -> None:
        parts = [rows for rows, _ in batch]
        if self._on_batch:
            self._on_batch(len(parts), sum(p.n for p in parts))
        try:
            if len(parts) > 1 and self.trust is Trust.PROBATION:
                results = await asyncio.to_thread(self._checked_call, parts)
            else:
                output = await asyncio.to_thread(self._call, parts)
                results = (
                    [normalize_output(output)]
                    if len(parts) == 1
                    else split_output(output, [p.n for p in parts])
                )
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][1], error=error)
                return
            for item in batch:  # find which request is at fault; the others still succeed
                await self._run([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)

    def _checked_call(self, parts: list[Rows]) -> list[np.ndarray | pd.DataFrame]:
        """Probation: the batch and each request alone; the lone answers are returned."""
        batched = split_output(self._call(parts), [p.n for p in parts])
        alone = [normalize_output(self._call([part])) for part in parts]
        if not all(_same(b, a) for b, a in zip(batched, alone, strict=True)):
            self._conclude(Trust.OFF, "a live batch predicted differently from its rows alone")
        else:
            self._checked_batches += 1
            if self._checked_batches >= PROBATION_BATCHES:
                self._conclude(Trust.ON, f"{self._checked_batches} live batches matched")
        return alone

    def _conclude(self, trust: Trust, why: str) -> None:
        if self.trust is not Trust.PROBATION:
            return
        self.trust = trust
        log.info("micro-batching %s: %s", trust.value, why)
        if self.on_verdict:
            self.on_verdict(trust)

    def _call(self, parts: list[Rows]) -> Any:
        started = time.perf_counter()
        output = self._predict(self._codec.concat(parts))
        seconds = time.perf_counter() - started
        previous = self.predict_seconds
        self.predict_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        return output


def _settle(
    future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None
) -> None:
    if future.done():
        return  # the caller went away
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        return (
            isinstance(a, pd.DataFrame)
            and isinstance(b, pd.DataFrame)
            and a.reset_index(drop=True).equals(b.reset_index(drop=True))
        )
    a, b = np.asarray(a), np.asarray(b)
    nan_is_nan = a.dtype.kind in "fc" and b.dtype.kind in "fc"
    return bool(np.array_equal(a, b, equal_nan=nan_is_nan))


def batch_invariance(
    predict: Callable[[Any], Any],
    codec: Codec,
    rows: list[Rows],
    sizes: tuple[int, ...] = (2, 3, 8, 16),
) -> bool | None:
    """Whether each row predicts bit-for-bit the same alone and inside batches of `sizes`;
    None when the model refused the rows (no evidence either way)."""
    try:
        alone = [normalize_output(predict(codec.concat([row]))) for row in rows]
        for size in sizes:
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                parts = split_output(predict(codec.concat(chunk)), [r.n for r in chunk])
                if not all(_same(p, a) for p, a in zip(parts, alone[start:], strict=False)):
                    return False
    except Exception:
        return None
    return True


def is_batch_invariant(predict: Callable[[Any], Any], codec: Codec, rows: list[Rows]) -> bool:
    """True when `rows` show each row predicts the same alone and inside batches."""
    return bool(codec.batchable and rows and batch_invariance(predict, codec, rows))


def judge_batching(
    predict: Callable[[Any], Any], codec: Codec, example: list[Rows], count: int = 16
) -> Trust:
    """ON or OFF from the model's input example; without one, OFF only on evidence (rows made
    from the signature that predict differently in a batch), else PROBATION."""
    if not codec.batchable:
        return Trust.OFF
    if example:
        return Trust.ON if is_batch_invariant(predict, codec, example) else Trust.OFF
    samples = codec.sample_rows(count)
    if samples and batch_invariance(predict, codec, samples) is False:
        return Trust.OFF
    return Trust.PROBATION
