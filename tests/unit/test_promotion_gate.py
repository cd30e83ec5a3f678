"""The promotion gate decides on the same held-out data, mode-aware, strictly better; NaN
never wins; a champion that cannot be read promotes nothing; and the alias is read again
before it moves (the interleaving against a real MLflow server is in
tests/integration/test_promotion_race.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from mlkube.api.registered_model import CHALLENGER_ALIAS
from mlkube.training.registry import (
    ChampionUnreadable,
    Evaluation,
    champion_evaluation,
    decide,
    run_gate,
)


def evaluation(new: float, champion: float | None, version: int | None = 1) -> Evaluation:
    return Evaluation("mae", {"mae": new}, version, None if champion is None else {"mae": champion})


def test_first_model_is_promoted() -> None:
    decision = decide(evaluation(100.0, None, None), "min", 0.0, True)
    assert decision.promote and "no current champion" in decision.reason


@pytest.mark.parametrize(
    ("new", "champion", "mode", "min_improvement", "promote"),
    [
        (90.0, 100.0, "min", 0.0, True),
        (100.0, 100.0, "min", 0.0, False),  # a tie does not beat the champion
        (110.0, 100.0, "min", 0.0, False),
        (96.0, 100.0, "min", 0.05, False),  # 4 % better, 5 % needed
        (94.0, 100.0, "min", 0.05, True),
        (0.91, 0.90, "max", 0.0, True),
        (0.89, 0.90, "max", 0.0, False),
        (0.5, 0.0, "max", 0.5, True),  # a zero champion: any gain is infinite
    ],
)
def test_gate_is_mode_aware_and_strict(
    new: float, champion: float, mode: str, min_improvement: float, promote: bool
) -> None:
    decision = decide(evaluation(new, champion), mode, min_improvement, True)  # type: ignore[arg-type]
    assert decision.promote is promote
    assert ("better:" in decision.reason) and (decision.reason.startswith("not") is not promote)


def test_disabled_promotion_never_promotes() -> None:
    decision = decide(evaluation(1.0, 100.0), "min", 0.0, False)
    assert not decision.promote and "disabled" in decision.reason


def test_champion_that_cannot_be_scored_is_replaced_and_the_reason_says_why() -> None:
    unscorable = Evaluation("mae", {"mae": 5.0}, 3, None, "ValueError: wrong columns")
    decision = decide(unscorable, "min", 0.0, True)
    assert decision.promote and "v3 could not be scored" in decision.reason


def _score_raising(error: Exception) -> Callable[[int], dict[str, float]]:
    def score(version: int) -> dict[str, float]:
        raise error

    return score


def test_a_champion_that_cannot_be_read_promotes_nothing_even_a_terrible_model() -> None:
    """The weak gate seen: a connection error scoring the champion let MAE 1e9 win."""
    down = _score_raising(ChampionUnreadable("ConnectionError: connection refused"))
    evaluation = champion_evaluation("mae", {"mae": 1e9}, 3, down)
    assert evaluation.champion_unreadable
    decision = decide(evaluation, "min", 0.0, True)
    assert not decision.promote
    assert decision.reason == (
        "champion v3 could not be read from MLflow to score it (ConnectionError: connection "
        "refused); nothing is promoted until it can be"
    )


def test_a_champion_of_another_shape_may_be_beaten() -> None:
    """Read fine, but it does not take this data: it cannot block a new model."""
    other_shape = _score_raising(KeyError("charges"))
    evaluation = champion_evaluation("mae", {"mae": 5.0}, 3, other_shape)
    assert not evaluation.champion_unreadable
    decision = decide(evaluation, "min", 0.0, True)
    assert decision.promote and "v3 could not be scored on this held-out data (KeyError" in (
        decision.reason
    )


@pytest.mark.parametrize("new", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("champion", [None, 10.0, math.nan])
def test_a_new_score_that_is_not_finite_never_wins(new: float, champion: float | None) -> None:
    version = None if champion is None else 1
    decision = decide(evaluation(new, champion, version), "min", 0.0, True)
    assert not decision.promote and "not a finite number" in decision.reason


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_champion_scoring_nan_is_beaten_by_any_finite_score(mode: str) -> None:
    decision = decide(evaluation(1e9, math.nan), mode, 0.5, True)  # type: ignore[arg-type]
    assert decision.promote and "champion v1 scores mae nan" in decision.reason


class Registry:
    """An alias and the champions' scores, in memory (the real server: the integration test)."""

    def __init__(self, holder: int | None, scores: dict[int, float]) -> None:
        self.holder, self.scores, self.moves = holder, scores, []  # type: list[str]

    def score(self, version: int) -> dict[str, float]:
        return {"mae": self.scores[version]}


def gate(registry: Registry, mine: int, evaluation: Evaluation, hold: Callable[[], None]) -> str:
    def move(alias: str) -> None:
        registry.moves.append(alias)
        if alias == "champion":
            registry.holder = mine

    result = run_gate(
        evaluation, lambda e: decide(e, "min", 0.0, True),
        read_alias=lambda: registry.holder, score=registry.score, move_alias=move,
        alias="champion", hold=hold,
    )  # fmt: skip
    return result.alias


def test_a_gate_decides_again_when_the_champion_moved_before_it_writes() -> None:
    """v2 (MAE 5) and v3 (MAE 8) both beat v1 (MAE 10); v3's gate read v1, and v2 became
    champion before v3 wrote: v3 must see v2, lose, and become challenger."""
    registry = Registry(1, {1: 10.0, 2: 5.0, 3: 8.0})
    stale = Evaluation("mae", {"mae": 8.0}, 1, {"mae": 10.0})

    def someone_else_promotes_v2() -> None:
        registry.holder = 2

    assert gate(registry, 3, stale, someone_else_promotes_v2) == CHALLENGER_ALIAS
    assert registry.holder == 2


def test_a_gate_that_lost_to_a_stale_champion_wins_against_a_worse_new_one() -> None:
    registry = Registry(1, {1: 5.0, 3: 8.0})
    stale = Evaluation("mae", {"mae": 6.0}, 1, {"mae": 5.0})  # not better than v1

    def someone_else_promotes_v3() -> None:
        registry.holder = 3

    assert gate(registry, 4, stale, someone_else_promotes_v3) == "champion"
    assert registry.holder == 4


def test_a_gate_whose_alias_keeps_moving_gives_up_and_promotes_nothing() -> None:
    registry = Registry(1, {n: 100.0 - n for n in range(1, 50)})
    moving = Evaluation("mae", {"mae": 1.0}, 1, {"mae": 99.0})

    def read() -> int | None:
        assert registry.holder is not None
        registry.holder += 1  # another run moves it every time it is read
        return registry.holder

    result = run_gate(
        moving, lambda e: decide(e, "min", 0.0, True), read_alias=read,
        score=registry.score, move_alias=registry.moves.append, alias="champion",
    )  # fmt: skip
    assert (result.alias, result.decision.promote) == (CHALLENGER_ALIAS, False)
    assert registry.moves == [CHALLENGER_ALIAS]
    assert "moved 5 times" in result.decision.reason


def test_local_gates_of_one_model_take_turns(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In local mode the re-read and the move of two gates never overlap (a file lock per
    model); with a tracking server there is no lock to take."""
    import threading
    import time

    from mlkube.training.registry import gate_lock

    monkeypatch.setenv("MLKUBE_HOME", str(tmp_path))
    order: list[str] = []
    first_in, release = threading.Event(), threading.Event()

    def first() -> None:
        with gate_lock("sqlite:///x.db", "m"):
            order.append("first in")
            first_in.set()
            release.wait(30)
            order.append("first out")

    def second() -> None:
        with gate_lock("sqlite:///x.db", "m"):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(30)
    threads[1].start()
    time.sleep(0.3)  # room for the second to get in, if the lock let it
    release.set()
    for thread in threads:
        thread.join(30)
    assert order == ["first in", "first out", "second in"]
    with gate_lock("http://mlflow:5000", "m"), gate_lock("http://mlflow:5000", "m"):
        pass  # no lock with a server: re-entering does not block
