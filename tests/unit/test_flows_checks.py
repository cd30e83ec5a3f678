"""Checks of a new window: schema, missing values, range, KS drift; and the decision."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from mlkube.flows.checks import CheckSettings, ks_statistic, run_checks
from mlkube.flows.ingest import IngestRecord
from mlkube.flows.retrain import decide_training
from mlkube.flows.retrain_models import IngestStep

SETTINGS = CheckSettings()
RANGE = (-40.0, 130.0)


def hours(start: str, count: int, values: np.ndarray | list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {"date": pd.date_range(start, periods=count, freq="h"), "temp": np.asarray(values, float)}
    )


def daily_cycle(days: int, offset: float = 0.0) -> np.ndarray:
    return 50 + offset + 8 * np.sin(np.arange(days * 24) * 2 * np.pi / 24)


REFERENCE = hours("2010-03-01", 30 * 24, daily_cycle(30))


def test_ks_statistic_matches_scipy() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(0.5, size=300)
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic)


def test_a_normal_day_passes_every_check() -> None:
    report = run_checks(hours("2010-03-31", 24, daily_cycle(1)), REFERENCE, SETTINGS, RANGE)
    assert [r.name for r in report.results] == ["schema", "missing", "range", "drift"]
    assert report.quality_ok and not report.drifted
    assert report.result("drift").value == pytest.approx(0.0, abs=0.05)  # type: ignore[union-attr]


def test_a_shifted_day_is_drift() -> None:
    report = run_checks(hours("2010-03-31", 24, daily_cycle(1, 25)), REFERENCE, SETTINGS, RANGE)
    assert report.quality_ok and report.drifted
    assert "KS 1.000 of 24 new hours against the 720 before" in report.first_failure().detail  # type: ignore[union-attr]


def test_too_few_hours_or_no_reference_are_not_tested() -> None:
    few = run_checks(hours("2010-03-31", 6, [90.0] * 6), REFERENCE, SETTINGS, RANGE)
    assert few.result("drift").skipped and not few.drifted  # type: ignore[union-attr]
    first = run_checks(
        hours("2010-01-01", 48, daily_cycle(2)), REFERENCE.iloc[0:0], SETTINGS, RANGE
    )
    assert first.result("drift").skipped  # type: ignore[union-attr]


def test_missing_values_and_absent_hours_count_together() -> None:
    window = hours("2010-03-31", 24, daily_cycle(1))
    window.loc[0:1, "temp"] = np.nan  # 2 empty values
    window = window.drop(index=[10, 11])  # 2 hours absent
    report = run_checks(window, REFERENCE, SETTINGS, RANGE)
    missing = report.result("missing")
    assert (
        missing is not None and missing.passed and missing.detail == "4 of 24 hours without a value"
    )
    strict = run_checks(window, REFERENCE, CheckSettings(max_missing_fraction=0.1), RANGE)
    assert not strict.quality_ok and strict.first_failure().name == "missing"  # type: ignore[union-attr]


def test_values_out_of_range_and_bad_schema_fail() -> None:
    window = hours("2010-03-31", 24, daily_cycle(1))
    window.loc[5, "temp"] = -99.0  # a sensor's "no value" sentinel
    report = run_checks(window, REFERENCE, SETTINGS, RANGE)
    assert report.first_failure().name == "range"  # type: ignore[union-attr]
    assert "1 values outside [-40, 130], e.g. -99" in report.first_failure().detail  # type: ignore[union-attr]
    custom = run_checks(window, REFERENCE, CheckSettings(value_range=(-100, 100)), RANGE)
    assert custom.quality_ok

    half_hours = window.assign(date=window["date"] + pd.Timedelta(minutes=30))
    assert run_checks(half_hours, REFERENCE, SETTINGS, RANGE).first_failure().detail == (  # type: ignore[union-attr]
        "'date' is not hourly"
    )
    text = window.assign(temp=window["temp"].astype(str))
    assert not run_checks(text, REFERENCE, SETTINGS, RANGE).quality_ok


def step(added: int, new: pd.DataFrame | None = None) -> IngestStep:
    checks = run_checks(new if new is not None else REFERENCE.iloc[0:0], REFERENCE, SETTINGS, RANGE)
    last = dt.datetime(2010, 3, 30, 23)
    return IngestStep(
        record=IngestRecord(
            dataset_uri="d.parquet", source="replay", at=dt.datetime.now(dt.UTC),
            rows_before=720, rows_fetched=added, rows_added=added, rows_after=720 + added,
            last_before=last,
            first_added=last + dt.timedelta(hours=1) if added else None,
            last_added=last + dt.timedelta(hours=added) if added else None,
        ),
        checks=checks, unit="°F",
    )  # fmt: skip


def test_decide_trains_on_new_checked_hours_and_says_why_it_skips() -> None:
    normal = decide_training(step(24, hours("2010-03-31", 24, daily_cycle(1))), force=False)
    assert normal.train and normal.reason == (
        "24 new hours (2010-03-31 00:00 to 2010-03-31 23:00), checks passed"
    )
    nothing = decide_training(step(0), force=False)
    assert not nothing.train
    assert nothing.reason == "no new data: the source has no hours after 2010-03-30 23:00"
    drifted = decide_training(step(24, hours("2010-03-31", 24, daily_cycle(1, 25))), force=False)
    assert not drifted.train and drifted.reason.startswith("drift: KS 1.000")
    forced = decide_training(step(0), force=True)
    assert forced.train and forced.reason.startswith("forced, although no new data")


def test_hours_no_run_trained_on_are_trained_even_without_new_ones() -> None:
    untrained = {"untrained_hours": 24, "untrained_first": dt.datetime(2010, 3, 30),
                 "untrained_last": dt.datetime(2010, 3, 30, 23)}  # fmt: skip
    earlier = decide_training(step(0).model_copy(update=untrained), force=False)
    assert earlier.train and earlier.reason == (
        "no new hours, but 24 hours held (2010-03-30 00:00 to 2010-03-30 23:00) that no run "
        "has trained on yet"
    )
    both = decide_training(
        step(24, hours("2010-03-31", 24, daily_cycle(1))).model_copy(update=untrained), False
    )
    assert both.train and both.reason.endswith(", checks passed, and 24 hours held "
                                               "(2010-03-30 00:00 to 2010-03-30 23:00) that no "
                                               "run has trained on yet")  # fmt: skip
