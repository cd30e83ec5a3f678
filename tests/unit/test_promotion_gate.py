"""The promotion gate decides on the same held-out data, mode-aware, strictly better."""

from __future__ import annotations

import pytest

from mlkube.training.registry import Evaluation, decide


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
