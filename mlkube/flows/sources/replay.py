"""`replay`: plays the offline sample (Seattle, hourly, 2010, in °F) forward a day per run.

For demos and tests of the scheduled loop without a network: the first run of an empty
dataset delivers `initialDays` days from `start`; every later run delivers the hours up to
the end of the next `daysPerRun` days; after `end` there is nothing new.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

import pandas as pd
from pydantic import Field

from mlkube.flows.sources.base import TIME_COLUMN, VALUE_COLUMN, SourceSettings


class ReplaySettings(SourceSettings):
    kind: Literal["replay"] = "replay"
    start: dt.date = Field(default=dt.date(2010, 1, 1), description="First day delivered.")
    initial_days: int = Field(
        default=60, ge=1, description="Days delivered to an empty dataset (training needs ~40)."
    )
    days_per_run: int = Field(default=1, ge=1)
    end: dt.date | None = Field(
        default=None, description="Last day ever delivered (inclusive); the sample's last day."
    )

    @property
    def unit(self) -> str:
        return "°F"

    @property
    def plausible_range(self) -> tuple[float, float]:
        return (-40.0, 130.0)

    def describe(self) -> str:
        return "replay of the offline sample (Seattle 2010)"

    def fetch_after(self, last: pd.Timestamp | None) -> pd.DataFrame:
        from mlkube.training.tasks.atmos_temperature import offline_sample

        sample = offline_sample()[[TIME_COLUMN, VALUE_COLUMN]]
        times = pd.to_datetime(sample[TIME_COLUMN])
        if last is None:
            begin = pd.Timestamp(self.start)
            stop = begin + pd.Timedelta(days=self.initial_days)
        else:
            begin = last + pd.Timedelta(hours=1)
            stop = begin.normalize() + pd.Timedelta(days=self.days_per_run)
        if self.end is not None:
            stop = min(stop, pd.Timestamp(self.end) + pd.Timedelta(days=1))
        window = sample[(times >= begin) & (times < stop)].copy()
        window[TIME_COLUMN] = pd.to_datetime(window[TIME_COLUMN])
        return window.reset_index(drop=True)
