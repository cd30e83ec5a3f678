"""Where new hourly observations come from: one module per source, one settings model each.

A source answers one question: which rows exist after a given hour? It returns a frame
with the columns `date` (hourly timestamps) and `temp`, plus whatever else it knows; the
ingest decides what is new and appends it. Sources are chosen by `kind` in the flow's
parameters, so adding one means a module here and a member of `AnySource`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mlkube.flows.sources.base import (
    TIME_COLUMN,
    VALUE_COLUMN,
    SourceError,
    SourceSettings,
)
from mlkube.flows.sources.kma_asos import KmaApiError, KmaAsosSettings
from mlkube.flows.sources.replay import ReplaySettings

AnySource = Annotated[KmaAsosSettings | ReplaySettings, Field(discriminator="kind")]

__all__ = [
    "TIME_COLUMN",
    "VALUE_COLUMN",
    "AnySource",
    "KmaApiError",
    "KmaAsosSettings",
    "ReplaySettings",
    "SourceError",
    "SourceSettings",
]
