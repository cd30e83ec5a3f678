"""What every source shares: the columns it delivers, its settings base, its errors."""

from __future__ import annotations

from abc import abstractmethod

import pandas as pd

from mlkube.api.common import CamelModel
from mlkube.api.errors import UserError

TIME_COLUMN = "date"
VALUE_COLUMN = "temp"


class SourceError(UserError):
    """A source could not deliver; the message is one line for the user."""


class SourceSettings(CamelModel):
    """The settings of one source; `fetch_after` is the whole interface."""

    kind: str

    @property
    @abstractmethod
    def unit(self) -> str:
        """The unit of `temp`, for reports."""

    @property
    @abstractmethod
    def plausible_range(self) -> tuple[float, float]:
        """Values of `temp` outside this range are sensor or parsing errors."""

    @abstractmethod
    def fetch_after(self, last: pd.Timestamp | None) -> pd.DataFrame:
        """Rows with `date` after `last` (the source's first window when `last` is None).

        Columns: `date` (hourly, naive timestamps), `temp` (float, NaN when missing) and
        any others the source knows. May return hours already held; the ingest drops them.
        """

    def describe(self) -> str:
        return self.kind


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {TIME_COLUMN: pd.Series(dtype="datetime64[ns]"), VALUE_COLUMN: pd.Series(dtype="float64")}
    )
