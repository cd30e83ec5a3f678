"""Checks of a new window of hourly data before it is kept and trained on.

Quality (schema, missing values, value range) decides whether the new rows are kept at
all; drift (the two-sample Kolmogorov-Smirnov statistic of the new window against the
preceding `referenceDays`) decides whether training on them is worth it. Pure pandas and
numpy: no Prefect, no MLflow, so the unit tests are quick.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from mlkube.api.common import CamelModel
from mlkube.flows.sources import TIME_COLUMN, VALUE_COLUMN


class CheckSettings(CamelModel):
    max_missing_fraction: float = Field(
        default=0.2, ge=0, le=1, description="Share of the new window's hours without a value."
    )
    value_range: tuple[float, float] | None = Field(
        default=None, description="Plausible [min, max] of temp; the source's range by default."
    )
    drift_threshold: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="KS statistic above which the new window counts as drifted. One day of "
        "the 2010 sample against its previous 30 days never exceeds 0.63.",
    )
    reference_days: int = Field(default=30, ge=1)
    min_hours_for_drift: int = Field(
        default=12, ge=2, description="Fewer new hours than this are too few to test."
    )


class CheckResult(BaseModel):
    name: Literal["schema", "missing", "range", "drift"]
    passed: bool
    detail: str
    value: float | None = None
    threshold: float | None = None
    skipped: bool = False


class CheckReport(BaseModel):
    results: list[CheckResult]

    def result(self, name: str) -> CheckResult | None:
        return next((r for r in self.results if r.name == name), None)

    @property
    def quality_ok(self) -> bool:
        return all(r.passed for r in self.results if r.name != "drift")

    @property
    def drifted(self) -> bool:
        drift = self.result("drift")
        return drift is not None and not drift.passed

    def first_failure(self) -> CheckResult | None:
        return next((r for r in self.results if not r.passed), None)


def check_schema(new: pd.DataFrame) -> CheckResult:
    missing = [c for c in (TIME_COLUMN, VALUE_COLUMN) if c not in new.columns]
    if missing:
        return CheckResult(name="schema", passed=False, detail=f"no {missing[0]!r} column")
    if not pd.api.types.is_datetime64_any_dtype(new[TIME_COLUMN]):
        return CheckResult(name="schema", passed=False, detail=f"{TIME_COLUMN!r} is not a time")
    if not pd.api.types.is_numeric_dtype(new[VALUE_COLUMN]):
        return CheckResult(name="schema", passed=False, detail=f"{VALUE_COLUMN!r} is not numeric")
    times = new[TIME_COLUMN]
    if times.isna().any():
        return CheckResult(name="schema", passed=False, detail=f"{TIME_COLUMN!r} has empty values")
    if not (times == times.dt.floor("h")).all():
        return CheckResult(name="schema", passed=False, detail=f"{TIME_COLUMN!r} is not hourly")
    return CheckResult(name="schema", passed=True, detail=f"{TIME_COLUMN}, {VALUE_COLUMN}: ok")


def check_missing(new: pd.DataFrame, settings: CheckSettings) -> CheckResult:
    """Hours without a value: empty values plus hours absent between the first and last."""
    times = new[TIME_COLUMN]
    span = int((times.max() - times.min()) / pd.Timedelta(hours=1)) + 1
    absent = span - len(new) + int(new[VALUE_COLUMN].isna().sum())
    fraction = absent / span
    return CheckResult(
        name="missing",
        passed=fraction <= settings.max_missing_fraction,
        detail=f"{absent} of {span} hours without a value",
        value=round(fraction, 4),
        threshold=settings.max_missing_fraction,
    )


def check_range(new: pd.DataFrame, low: float, high: float) -> CheckResult:
    values = new[VALUE_COLUMN].dropna()
    outside = values[(values < low) | (values > high)]
    detail = f"all within [{low:g}, {high:g}]"
    if len(outside):
        detail = f"{len(outside)} values outside [{low:g}, {high:g}], e.g. {outside.iloc[0]:g}"
    return CheckResult(name="range", passed=outside.empty, detail=detail, value=float(len(outside)))


def ks_statistic(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs."""
    sample, reference = np.sort(sample), np.sort(reference)
    points = np.concatenate([sample, reference])
    cdf_sample = np.searchsorted(sample, points, side="right") / len(sample)
    cdf_reference = np.searchsorted(reference, points, side="right") / len(reference)
    return float(np.max(np.abs(cdf_sample - cdf_reference)))


def check_drift(new: pd.DataFrame, existing: pd.DataFrame, settings: CheckSettings) -> CheckResult:
    values = new[VALUE_COLUMN].dropna().to_numpy(dtype="float64")
    threshold = settings.drift_threshold
    if len(values) < settings.min_hours_for_drift:
        return CheckResult(
            name="drift", passed=True, skipped=True, threshold=threshold,
            detail=f"not tested: {len(values)} new hours (needs {settings.min_hours_for_drift})",
        )  # fmt: skip
    begin = new[TIME_COLUMN].min()
    window = (existing[TIME_COLUMN] < begin) & (
        existing[TIME_COLUMN] >= begin - pd.Timedelta(days=settings.reference_days)
    )
    reference = existing.loc[window, VALUE_COLUMN].dropna().to_numpy(dtype="float64")
    if len(reference) < 24:
        return CheckResult(
            name="drift", passed=True, skipped=True, threshold=threshold,
            detail=f"not tested: {len(reference)} reference hours before {begin}",
        )  # fmt: skip
    statistic = ks_statistic(values, reference)
    return CheckResult(
        name="drift",
        passed=statistic <= threshold,
        detail=f"KS {statistic:.3f} of {len(values)} new hours against the "
        f"{len(reference)} before (threshold {threshold:g})",
        value=round(statistic, 4),
        threshold=threshold,
    )


def run_checks(
    new: pd.DataFrame,
    existing: pd.DataFrame,
    settings: CheckSettings,
    plausible_range: tuple[float, float],
) -> CheckReport:
    """All checks of the new rows; an empty window passes them all (nothing to check)."""
    if new.empty:
        return CheckReport(results=[])
    schema = check_schema(new)
    if not schema.passed:
        return CheckReport(results=[schema])
    low, high = settings.value_range or plausible_range
    return CheckReport(
        results=[
            schema,
            check_missing(new, settings),
            check_range(new, low, high),
            check_drift(new, existing, settings),
        ]
    )
