"""Reading the tasks' datasets from any URI pandas/fsspec understands, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mlkube.api.errors import first_line
from mlkube.training.tasks.base import DataError

if TYPE_CHECKING:  # imported when a table is read, not when a spec is checked
    import pandas as pd


def local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


def read_table(uri: str) -> pd.DataFrame:
    """A CSV or Parquet table; the format follows the file name."""
    import pandas as pd

    path = local_path(uri)
    if path is not None and not path.exists():
        raise DataError(f"dataset.uri: no such file: {uri}")
    try:
        if uri.endswith((".parquet", ".pq")):
            return pd.read_parquet(uri)
        return pd.read_csv(uri)
    except (OSError, ValueError, ImportError) as error:
        raise DataError(f"dataset.uri: cannot read {uri}: {first_line(error)}") from None


def require_columns(frame: pd.DataFrame, columns: list[str], uri: str, field: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{field}: column {missing[0]!r} not in {uri} "
            f"(columns: {', '.join(map(str, frame.columns))})"
        )
