"""Ingest: only new hours, idempotent, atomic (a killed run changes nothing), a ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from mlkube.flows.ingest import (
    DatasetSettings,
    IngestRecord,
    commit,
    dataset_lock,
    only_new_hours,
    plan_ingest,
    read_dataset,
    read_ledger,
)
from mlkube.flows.sources import ReplaySettings

REPO = Path(__file__).resolve().parents[2]
REPLAY = ReplaySettings(initial_days=3, end="2010-01-05")


def frame(hours: list[str], values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"date": pd.to_datetime(hours), "temp": values})


def test_only_hours_after_the_last_held_each_once() -> None:
    held = frame(["2024-01-01 00:00", "2024-01-01 01:00"], [1.0, 2.0])
    fetched = frame(
        ["2024-01-01 01:00", "2024-01-01 03:00", "2024-01-01 02:00", "2024-01-01 03:00"],
        [9.0, 3.0, 2.5, 3.5],
    )
    new = only_new_hours(held, fetched)
    assert new["date"].dt.hour.tolist() == [2, 3]
    assert new["temp"].tolist() == [2.5, 3.5]  # the source's latest answer for 03:00 wins


@pytest.mark.parametrize("name", ["atmos.parquet", "atmos.csv"])
def test_replay_appends_one_day_per_run_until_its_end(tmp_path: Path, name: str) -> None:
    dataset = DatasetSettings(uri=str(tmp_path / "data" / name))
    added = [commit(plan_ingest(dataset, REPLAY), dataset).rows_added for _ in range(4)]
    assert added == [72, 24, 24, 0]
    held = read_dataset(dataset)
    assert len(held) == 120 and held["date"].is_unique and held["date"].is_monotonic_increasing
    assert held["date"].iloc[-1] == pd.Timestamp("2010-01-05 23:00")
    entries = read_ledger(dataset)
    assert [e["rows_added"] for e in entries] == [72, 24, 24]  # runs that added nothing: none
    assert entries[-1]["first_added"] == "2010-01-05T00:00:00" and entries[-1]["committed"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [name, f"{name}.ledger.json"]


def test_any_fsspec_uri(tmp_path: Path) -> None:
    dataset = DatasetSettings(uri="memory://mlkube-test/atmos.parquet")
    assert commit(plan_ingest(dataset, REPLAY), dataset).rows_added == 72
    assert commit(plan_ingest(dataset, REPLAY), dataset).rows_added == 24
    assert len(read_dataset(dataset)) == 96


def test_home_is_expanded_for_local_paths() -> None:
    assert DatasetSettings(uri="~/d.parquet").uri == str(Path.home() / "d.parquet")
    assert DatasetSettings(uri="s3://b/d.parquet").uri == "s3://b/d.parquet"


# An ingest that stops at the commit point: the new table is written to the temp file
# beside the dataset, and the process waits to be killed before the rename.
KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from mlkube.flows import ingest
    from mlkube.flows.sources import ReplaySettings

    def stop_here(fs, temp, path):
        print(temp, flush=True)
        time.sleep(3600)

    ingest.replace_atomically = stop_here
    dataset = ingest.DatasetSettings(uri=sys.argv[1])
    source = ReplaySettings(initial_days=3, end="2010-01-05")
    with ingest.dataset_lock(dataset):
        ingest.commit(ingest.plan_ingest(dataset, source), dataset)
    """
)


def locked_ingest(dataset: DatasetSettings) -> IngestRecord:
    """What a run does: read, fetch and commit with the dataset's lock held."""
    with dataset_lock(dataset):
        return commit(plan_ingest(dataset, REPLAY), dataset)


@pytest.mark.parametrize("name", ["atmos.parquet", "atmos.csv"])
def test_a_run_killed_before_the_rename_leaves_the_dataset_as_it_was(
    tmp_path: Path, name: str
) -> None:
    dataset = DatasetSettings(uri=str(tmp_path / name))
    commit(plan_ingest(dataset, REPLAY), dataset)  # 3 days held
    before = Path(dataset.uri).read_bytes()
    ledger_before = Path(dataset.uri + ".ledger.json").read_bytes()

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, dataset.uri],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert child.stdout is not None
    temp = Path(child.stdout.readline().strip())  # the child is now at the commit point
    assert temp.parent == tmp_path and temp.exists() and temp.stat().st_size > 0
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    assert Path(dataset.uri).read_bytes() == before
    assert Path(dataset.uri + ".ledger.json").read_bytes() == ledger_before
    assert len(read_dataset(dataset)) == 72

    # The next run adds the same day, exactly once, and clears the dead run's temp file
    # (the dead run's lock went with it).
    record = locked_ingest(dataset)
    assert (record.rows_added, record.rows_after) == (24, 96)
    assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{name}.lock",
        name,
        f"{name}.ledger.json",
    ]
    assert [e["rows_added"] for e in json.loads(
        Path(dataset.uri + ".ledger.json").read_text())["entries"]] == [72, 24]  # fmt: skip


def test_a_failed_write_removes_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlkube.flows import ingest

    dataset = DatasetSettings(uri=str(tmp_path / "atmos.parquet"))
    commit(plan_ingest(dataset, REPLAY), dataset)
    before = Path(dataset.uri).read_bytes()

    def disk_full(fs: object, temp: str, path: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest, "replace_atomically", disk_full)
    with pytest.raises(ingest.DatasetError, match="cannot write .*No space left"):
        commit(plan_ingest(dataset, REPLAY), dataset)
    assert Path(dataset.uri).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "atmos.parquet",
        "atmos.parquet.ledger.json",
    ]


# A run that holds the dataset's lock and stops at its commit point until told to go on.
PAUSED_CHILD = textwrap.dedent(
    """
    import sys
    from mlkube.flows import ingest
    from mlkube.flows.sources import ReplaySettings

    rename = ingest.replace_atomically

    def pause_here(fs, temp, path):  # the dataset's rename; the ledger's goes on
        ingest.replace_atomically = rename
        print(temp, flush=True)
        sys.stdin.readline()
        rename(fs, temp, path)

    ingest.replace_atomically = pause_here
    dataset = ingest.DatasetSettings(uri=sys.argv[1])
    source = ReplaySettings(initial_days=3, end="2010-01-05")
    with ingest.dataset_lock(dataset):
        print(ingest.commit(ingest.plan_ingest(dataset, source), dataset).rows_added)
    """
)


def test_two_runs_at_once_take_turns_and_both_succeed(tmp_path: Path) -> None:
    dataset = DatasetSettings(uri=str(tmp_path / "atmos.parquet"))
    locked_ingest(dataset)  # 3 days held
    config = tmp_path / "retrain.yaml"
    config.write_text(json.dumps({
        "source": {"kind": "replay", "initialDays": 3, "end": "2010-01-05"},
        "dataset": {"uri": dataset.uri},
        "trainingrunFile": str(REPO / "examples" / "atmos-temperature" / "trainingrun.yaml"),
    }))  # fmt: skip

    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CHILD, dataset.uri],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert first.stdin is not None and first.stdout is not None
    temp = Path(first.stdout.readline().strip())  # the first run is at its commit point
    # The second run, by hand: `mlkube ingest` on the same dataset.
    second = subprocess.Popen(
        [sys.executable, "-m", "mlkube", "ingest", "-f", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert second.stderr is not None
    said = second.stderr.readline()
    assert said == f"waiting for another run's ingest of {dataset.uri} to finish\n"
    assert temp.exists()  # the second run left the first one's temp file alone

    first.stdin.write("go\n")
    first.stdin.flush()
    assert first.wait(timeout=120) == 0 and first.stdout.read().strip() == "24"
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert out.splitlines()[-1] == f"{dataset.uri}: 24 new hours (2010-01-05 00:00:00 to " \
        "2010-01-05 23:00:00), 120 held"  # fmt: skip
    assert [e["rows_added"] for e in read_ledger(dataset)] == [72, 24, 24]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".atmos.parquet.lock",
        "atmos.parquet",
        "atmos.parquet.ledger.json",
        "retrain.yaml",
    ]
