"""Batching for models without an input example: judged on rows made from the signature, then
on the first live batches, and never an answer that depends on the batch."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mlkube.model_servers.batching import PROBATION_BATCHES, MicroBatcher, Trust, judge_batching
from mlkube.model_servers.codec import Column, Rows, TabularCodec, TensorCodec

NUMERIC = TabularCodec([Column("age", "long"), Column("bmi", "double"), Column("ok", "boolean")])
WITH_STRINGS = TabularCodec([Column("bmi", "double"), Column("smoker", "string")])


def elementwise(frame: pd.DataFrame) -> np.ndarray:
    return frame["bmi"].to_numpy() * 2 + frame["age"].to_numpy()


def one_row_path(frame: pd.DataFrame) -> np.ndarray:  # like BLAS: 1 row takes another path
    return elementwise(frame) + (1e-12 if len(frame) == 1 else 0.0)


def record_rows(count: int) -> list[Rows]:
    rng = np.random.default_rng(1)
    return [
        NUMERIC.decode_v1({"instances": [{"age": int(a), "bmi": float(b), "ok": True}]})
        for a, b in zip(rng.integers(18, 65, count), rng.random(count) * 40, strict=True)
    ]


def test_signature_rows_follow_the_columns_kinds_and_skip_what_they_cannot_know() -> None:
    rows = NUMERIC.sample_rows(4)
    assert len(rows) == 4 and all(r.n == 1 for r in rows)
    frame = NUMERIC.concat(rows)
    assert list(frame.dtypes.astype(str)) == ["int64", "float64", "bool"]
    assert NUMERIC.concat(NUMERIC.sample_rows(4)).equals(frame)  # the same on every load
    assert WITH_STRINGS.sample_rows(4) == []  # valid categories are unknown
    assert TensorCodec(np.dtype("float32"), (-1, 4)).concat(
        TensorCodec(np.dtype("float32"), (-1, 4)).sample_rows(3)
    ).shape == (3, 4)
    assert TensorCodec(np.dtype("float32"), (-1, -1)).sample_rows(3) == []


def test_without_an_input_example_batching_starts_on_probation_or_off_on_evidence() -> None:
    example = record_rows(16)
    assert judge_batching(elementwise, NUMERIC, example) is Trust.ON
    assert judge_batching(one_row_path, NUMERIC, example) is Trust.OFF
    assert judge_batching(elementwise, NUMERIC, []) is Trust.PROBATION
    assert judge_batching(one_row_path, NUMERIC, []) is Trust.OFF  # the signature's rows show it

    def needs_known_smoker(frame: pd.DataFrame) -> np.ndarray:
        return frame["bmi"].to_numpy()

    assert judge_batching(needs_known_smoker, WITH_STRINGS, []) is Trust.PROBATION

    def refuses_made_up_rows(frame: pd.DataFrame) -> np.ndarray:
        if (frame["bmi"] < 0).any():
            raise ValueError("bmi must be positive")
        return elementwise(frame)

    assert judge_batching(refuses_made_up_rows, NUMERIC, []) is Trust.PROBATION  # no evidence


def burst(batcher: MicroBatcher, rows: list[Rows], rounds: int) -> list[list[Any]]:
    async def main() -> list[list[Any]]:
        answers = []
        for _ in range(rounds):
            results = await asyncio.gather(*(batcher.submit(r) for r in rows))
            answers.append([np.asarray(r).tolist() for r in results])
        return answers

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("predict", "verdict"), [(elementwise, Trust.ON), (one_row_path, Trust.OFF)]
)
def test_probation_answers_row_by_row_until_live_batches_decide(
    predict: Any, verdict: Trust
) -> None:
    rows = record_rows(6)
    alone = [np.asarray(predict(NUMERIC.concat([r]))).tolist() for r in rows]
    sizes: list[int] = []
    verdicts: list[Trust] = []

    def counted(frame: pd.DataFrame) -> np.ndarray:
        sizes.append(len(frame))
        return np.asarray(predict(frame))

    batcher = MicroBatcher(
        counted, NUMERIC, trust=Trust.PROBATION, inline_below=0.0, on_verdict=verdicts.append
    )
    answers = burst(batcher, rows, PROBATION_BATCHES + 2)
    assert all(round_ == alone for round_ in answers)  # never an answer from a batch on trial
    assert verdicts == [verdict] and batcher.trust is verdict
    assert max(sizes) > 1  # batches were formed and tried
    if verdict is Trust.OFF:
        assert sizes[-len(rows) :] == [1] * len(rows)  # no batch after the verdict


def closed_loop(
    batcher: MicroBatcher,
    rows: list[Rows],
    rounds: int,
    running: list[int] | None = None,
    one_by_one: bool = False,
) -> list[list[Any]]:
    """Each client sends its next request as soon as it has its answer, the clients one loop
    iteration apart, as gRPC hands calls over one at a time. `running[0]`: clients not done."""
    running = [0] if running is None else running
    running[0] = len(rows)

    async def client(index: int, row: Rows) -> list[Any]:
        answers = []
        for _ in range(rounds):
            for _ in range(index):
                await asyncio.sleep(0)
            answer = await batcher.submit(row, alone=False, one_by_one=one_by_one)
            answers.append(np.asarray(answer).tolist())
        running[0] -= 1
        return answers

    async def main() -> list[list[Any]]:
        return list(await asyncio.gather(*(client(i, r) for i, r in enumerate(rows))))

    return asyncio.run(main())


def recording_batcher(
    running: list[int], rounds: list[tuple[int, int]], **waits: float
) -> MicroBatcher:
    """A batcher of `elementwise` that records each round: (requests taken, clients not
    done)."""
    return MicroBatcher(
        elementwise,
        NUMERIC,
        inline_below=0.0,
        on_batch=lambda requests, _: rounds.append((requests, running[0])),
        **waits,
    )


def test_a_round_waits_for_the_requests_the_last_round_answered() -> None:
    rows = record_rows(8)
    alone = [np.asarray(elementwise(NUMERIC.concat([r]))).tolist() for r in rows]
    running = [0]
    rounds: list[tuple[int, int]] = []
    # generous waits: the rounds end because every expected request came, never by the clock
    batcher = recording_batcher(running, rounds, linger_gap=2.0, linger_max=60.0)
    batcher.predict_seconds = 60.0  # as if predicts were slow: lingering is worth it

    answers = closed_loop(batcher, rows, 10, running)

    assert answers == [[a] * 10 for a in alone]
    # The first round takes the first client alone; each round waits for the clients the
    # last one answered and those that came meanwhile, so rounds grow to all 8, and from
    # then on each round takes every client still running.
    taken = [requests for requests, _ in rounds]
    assert taken[0] == 1 and 8 in taken
    assert all(requests == left for requests, left in rounds[taken.index(8) :])


def test_grpc_rounds_wait_longer_than_one_predict() -> None:
    rows = record_rows(8)
    running = [0]
    rounds: list[tuple[int, int]] = []
    batcher = recording_batcher(
        running, rounds, linger_gap=0.0, linger_max=0.0, one_by_one_gap=2.0, one_by_one_max=60.0
    )
    batcher.predict_seconds = 1e-9  # REST rounds would not wait at all

    closed_loop(batcher, rows, 10, running, one_by_one=True)

    taken = [requests for requests, _ in rounds]
    assert 8 in taken
    assert all(requests == left for requests, left in rounds[taken.index(8) :])


def test_without_trust_in_batches_a_round_does_not_wait() -> None:
    rows = record_rows(4)
    batches: list[int] = []
    batcher = MicroBatcher(
        one_row_path,
        NUMERIC,
        trust=Trust.OFF,
        inline_below=0.0,
        on_batch=lambda requests, _: batches.append(requests),
        linger_gap=3600.0,
        linger_max=3600.0,
    )
    batcher.predict_seconds = 3600.0
    closed_loop(batcher, rows, rounds=3)  # would take hours if it waited
    assert batches == [1] * 12
