"""Ingest: append the hours a source has and the dataset lacks, atomically, with a ledger.

The dataset (Parquet or CSV, by its name; any fsspec URI) is the truth about what is held:
a run asks the source for rows after the dataset's last hour, keeps only hours it does not
have (no duplicates, however often it runs), and writes the whole table to a temp file
beside the dataset, then renames it over the dataset. A run that dies at any point leaves
the dataset as it was; the next run finds the same gap and fills it. On object stores
(s3://, gs://) a written object appears whole, so the rename step is a copy there.

What each run added is appended to a small JSON ledger next to the dataset
(`<dataset>.ledger.json`), written the same way, after the dataset. The ledger also keeps
`decidedThrough`: the last hour a run handed to a training (or skipped on purpose, for
drift). Hours after it were committed by a run whose training never started, so the next
run trains on them even when the source has nothing new.

One ingest per local dataset at a time: a run holds an exclusive lock on `.<name>.lock`
beside the dataset (flock: the kernel releases it when the process dies) from reading the
dataset to writing the ledger. So a temp file found while holding the lock belongs to a
dead run and is removed; a live run's never is.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field, field_validator

from mlkube.api.common import CamelModel
from mlkube.api.errors import UserError, first_line
from mlkube.flows.sources import TIME_COLUMN, SourceSettings
from mlkube.flows.sources.base import empty_frame

LEDGER_SUFFIX = ".ledger.json"
LEDGER_KEEP = 1000  # entries; older ones are dropped so the file stays small
TEMP_MARK = ".tmp-"
LOCK_SUFFIX = ".lock"
LOCK_POLL_SECONDS = 0.2


class DatasetError(UserError):
    """The dataset cannot be read or written; one line for the user."""


class DatasetSettings(CamelModel):
    uri: str = Field(description="Parquet (.parquet/.pq) or CSV; any fsspec URI.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    lock_timeout_seconds: float = Field(
        default=1800, gt=0, description="How long a run waits for another run of this dataset."
    )

    @field_validator("uri")
    @classmethod
    def _expand_home(cls, uri: str) -> str:
        # The TrainingRun gets this URI too, so a local path is made absolute here.
        return str(Path(uri).expanduser().absolute()) if "://" not in uri else uri


class IngestPlan(BaseModel):
    """What a run found: the dataset as held and the rows to add (not yet written)."""

    model_config = {"arbitrary_types_allowed": True}

    dataset_uri: str
    source: str
    existing: pd.DataFrame
    new: pd.DataFrame
    rows_fetched: int

    @property
    def last_before(self) -> pd.Timestamp | None:
        return last_hour(self.existing)


class IngestRecord(BaseModel):
    """One ledger entry, and the ingest part of a flow's report."""

    dataset_uri: str
    source: str
    at: dt.datetime
    flow_run_id: str | None = None
    rows_before: int
    rows_fetched: int
    rows_added: int
    rows_after: int
    first_added: dt.datetime | None = None
    last_added: dt.datetime | None = None
    last_before: dt.datetime | None = None
    committed: bool = False
    note: str | None = None


# --------------------------------------------------------------------------- reading


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    found: tuple[Any, str] = url_to_fs(uri, **(storage_options or {}))
    return found


def is_parquet(uri: str) -> bool:
    return uri.endswith((".parquet", ".pq"))


def read_dataset(settings: DatasetSettings) -> pd.DataFrame:
    """The table as held, `date` parsed and sorted; an empty table when there is none yet."""
    fs, path = filesystem(settings.uri, settings.storage_options)
    if not fs.exists(path):
        return empty_frame()
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read()
        frame = (
            pd.read_parquet(io.BytesIO(data)) if is_parquet(path) else pd.read_csv(io.BytesIO(data))
        )
    except (OSError, ValueError) as error:
        raise DatasetError(
            f"dataset.uri: cannot read {settings.uri}: {first_line(error)}"
        ) from None
    if TIME_COLUMN not in frame.columns:
        raise DatasetError(f"dataset.uri: {settings.uri} has no {TIME_COLUMN!r} column")
    frame[TIME_COLUMN] = pd.to_datetime(frame[TIME_COLUMN])
    return frame.sort_values(TIME_COLUMN, kind="stable").reset_index(drop=True)


def last_hour(frame: pd.DataFrame) -> pd.Timestamp | None:
    if frame.empty:
        return None
    return pd.Timestamp(frame[TIME_COLUMN].max())


def only_new_hours(existing: pd.DataFrame, fetched: pd.DataFrame) -> pd.DataFrame:
    """Hours after the last one held, each once (the source's latest answer wins)."""
    if fetched.empty:
        return fetched.iloc[0:0].copy()
    rows = fetched.copy()
    rows[TIME_COLUMN] = pd.to_datetime(rows[TIME_COLUMN]).dt.floor("h")
    last = last_hour(existing)
    if last is not None:
        rows = rows[rows[TIME_COLUMN] > last]
    rows = rows.drop_duplicates(TIME_COLUMN, keep="last")
    return rows.sort_values(TIME_COLUMN, kind="stable").reset_index(drop=True)


def plan_ingest(dataset: DatasetSettings, source: SourceSettings) -> IngestPlan:
    existing = read_dataset(dataset)
    fetched = source.fetch_after(last_hour(existing))
    return IngestPlan(
        dataset_uri=dataset.uri,
        source=source.describe(),
        existing=existing,
        new=only_new_hours(existing, fetched),
        rows_fetched=len(fetched),
    )


# --------------------------------------------------------------------------- writing


def temp_path_beside(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}" if head else f".{name}{TEMP_MARK}x"


def table_bytes(frame: pd.DataFrame, path: str) -> bytes:
    buffer = io.BytesIO()
    if is_parquet(path):
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False, date_format="%Y-%m-%d %H:%M:%S")
    return buffer.getvalue()


def write_temp(fs: Any, temp: str, data: bytes) -> None:
    with fs.open(temp, "wb") as handle:
        handle.write(data)
        if is_local(fs):
            handle.flush()
            os.fsync(handle.fileno())


def is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def replace_atomically(fs: Any, temp: str, path: str) -> None:
    """The commit point: before it the old file is whole, after it the new one is."""
    if is_local(fs):
        os.replace(temp, path)
        # The rename itself must reach the disk, or a crash could bring the old name back.
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    else:
        fs.mv(temp, path)


def write_atomically(fs: Any, path: str, data: bytes) -> None:
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temp = temp_path_beside(path)
    try:
        write_temp(fs, temp, data)
        replace_atomically(fs, temp, path)
    except BaseException:
        if fs.exists(temp):
            fs.rm(temp)
        raise


def remove_stale_temps(path: Path) -> None:
    """Temp files of runs that were killed before their rename; only called with the
    dataset's lock held, when no live run can have one."""
    for stale in path.parent.glob(f".{path.name}{TEMP_MARK}*"):
        stale.unlink(missing_ok=True)


@contextmanager
def dataset_lock(
    settings: DatasetSettings, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Holds the dataset's lock (local files; object stores have no lock to take, so one
    schedule per dataset there); `on_wait` hears once that another run holds it."""
    fs, path = filesystem(settings.uri, settings.storage_options)
    if not is_local(fs):
        yield
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Opened for appending: the lock file is never truncated or removed, so every run
    # locks the same inode.
    with open(target.parent / f".{target.name}{LOCK_SUFFIX}", "ab") as handle:
        deadline = time.monotonic() + settings.lock_timeout_seconds
        told = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DatasetError(
                        f"dataset.uri: another run has held {settings.uri} for more than "
                        f"{settings.lock_timeout_seconds:g} s (lockTimeoutSeconds)"
                    ) from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for another run's ingest of {settings.uri} to finish")
                    told = True
                time.sleep(LOCK_POLL_SECONDS)
        try:
            remove_stale_temps(target)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ledger_uri(dataset_uri: str) -> str:
    return dataset_uri + LEDGER_SUFFIX


class Ledger(CamelModel):
    """`<dataset>.ledger.json`."""

    dataset: str
    decided_through: dt.datetime | None = Field(
        default=None,
        description="The last hour a run handed to a training or skipped on purpose; "
        "none yet: every hour held is still to be trained on.",
    )
    entries: list[dict[str, Any]] = Field(default_factory=list)


def read_ledger_document(settings: DatasetSettings) -> Ledger:
    fs, path = filesystem(ledger_uri(settings.uri), settings.storage_options)
    if not fs.exists(path):
        return Ledger(dataset=settings.uri)
    with fs.open(path, "rb") as handle:
        document = json.loads(handle.read() or b"{}")
    document.setdefault("dataset", settings.uri)
    return Ledger.model_validate(document)


def read_ledger(settings: DatasetSettings) -> list[dict[str, Any]]:
    return read_ledger_document(settings).entries


def write_ledger(settings: DatasetSettings, ledger: Ledger) -> None:
    fs, path = filesystem(ledger_uri(settings.uri), settings.storage_options)
    document = ledger.model_dump(mode="json", by_alias=True)
    write_atomically(fs, path, json.dumps(document, indent=1).encode())


def append_ledger(settings: DatasetSettings, record: IngestRecord) -> None:
    ledger = read_ledger_document(settings)
    ledger.entries = [*ledger.entries, record.model_dump(mode="json")][-LEDGER_KEEP:]
    write_ledger(settings, ledger)


def mark_decided(settings: DatasetSettings, through: dt.datetime) -> None:
    """Records that the hours up to `through` went to a training (or were skipped on
    purpose). Never moves back: runs may finish in any order."""
    with dataset_lock(settings):
        ledger = read_ledger_document(settings)
        if ledger.decided_through is not None and ledger.decided_through >= through:
            return
        ledger.decided_through = through
        write_ledger(settings, ledger)


def undecided_hours(existing: pd.DataFrame, decided_through: dt.datetime | None) -> pd.DataFrame:
    """Rows held that no run has handed to a training: committed by a run whose
    TrainingRun was never submitted (or held before any run trained)."""
    if decided_through is None:
        return existing
    return existing[existing[TIME_COLUMN] > pd.Timestamp(decided_through)]


def commit(
    plan: IngestPlan, dataset: DatasetSettings, flow_run_id: str | None = None
) -> IngestRecord:
    """Writes existing + new rows over the dataset (if there are new rows) and the ledger."""
    record = plan_record(
        plan,
        dataset,
        flow_run_id,
        rows_added=len(plan.new),
        first_added=None if plan.new.empty else plan.new[TIME_COLUMN].min().to_pydatetime(),
        last_added=None if plan.new.empty else plan.new[TIME_COLUMN].max().to_pydatetime(),
    )
    if plan.new.empty:
        return record
    fs, path = filesystem(dataset.uri, dataset.storage_options)
    parts = [frame for frame in (plan.existing, plan.new) if not frame.empty]
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    try:
        write_atomically(fs, path, table_bytes(table, path))
    except OSError as error:
        raise DatasetError(
            f"dataset.uri: cannot write {dataset.uri}: {first_line(error)}"
        ) from None
    record.committed = True
    append_ledger(dataset, record)
    return record


def not_committed(
    plan: IngestPlan, dataset: DatasetSettings, why: str, flow_run_id: str | None = None
) -> IngestRecord:
    """The record of a run whose rows were refused by the checks (nothing written)."""
    return plan_record(plan, dataset, flow_run_id, rows_added=0, note=why)


def plan_record(
    plan: IngestPlan, dataset: DatasetSettings, flow_run_id: str | None, **fields: Any
) -> IngestRecord:
    """What a run found and did; `fields` say what it added."""
    last = plan.last_before
    return IngestRecord(
        dataset_uri=dataset.uri,
        source=plan.source,
        at=dt.datetime.now(dt.UTC),
        flow_run_id=flow_run_id,
        rows_before=len(plan.existing),
        rows_fetched=plan.rows_fetched,
        rows_after=len(plan.existing) + fields.get("rows_added", 0),
        last_before=None if last is None else last.to_pydatetime(),
        **fields,
    )
