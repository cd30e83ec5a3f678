"""The kma-asos source against a local server that answers in the documented format."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest

from mlkube.flows.ingest import DatasetSettings, commit, plan_ingest, read_dataset
from mlkube.flows.sources import KmaApiError, KmaAsosSettings, SourceError
from mlkube.flows.sources.kma_asos import ALLOWED_HOSTS_ENV
from tests.fixtures.kma_server import KmaServer, hourly_observations, observation

START = dt.datetime(2024, 3, 1)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> KmaServer:
    with KmaServer() as running:
        monkeypatch.setenv("KMA_SERVICE_KEY", running.service_key)
        monkeypatch.setenv(ALLOWED_HOSTS_ENV, host_port(running.url))
        yield running  # type: ignore[misc]


def host_port(url: str) -> str:
    return url.split("/")[2]


def settings(server: KmaServer, **extra: object) -> KmaAsosSettings:
    fields = {"url": server.url, "start": "2024-03-01", "end": "2024-03-03", "pageSize": 20,
              "retryBackoffSeconds": 0, **extra}  # fmt: skip
    return KmaAsosSettings.model_validate(fields)


def test_pages_through_the_range_and_maps_the_documented_fields(server: KmaServer) -> None:
    server.observations[108] = hourly_observations(START, 72)
    frame = settings(server).fetch_after(None)

    assert len(frame) == 72 and frame["date"].is_monotonic_increasing
    assert frame["date"].iloc[0] == pd.Timestamp("2024-03-01 00:00")
    assert frame["date"].iloc[-1] == pd.Timestamp("2024-03-03 23:00")
    assert frame["temp"].iloc[1] == pytest.approx(5.2)  # "5.2" -> 5.2 °C
    assert set(frame["station_id"]) == {108}
    assert frame["humidity"].iloc[0] == 55 and frame["wind_speed"].iloc[0] == pytest.approx(1.8)
    # 72 rows at 20 a page: pages 1..4, each with the documented parameters.
    assert [r["pageNo"] for r in server.requests] == ["1", "2", "3", "4"]
    first = server.requests[0]
    assert first["dataType"] == "JSON" and first["dataCd"] == "ASOS" and first["dateCd"] == "HR"
    assert (first["startDt"], first["startHh"], first["endDt"], first["endHh"]) == (
        "20240301", "00", "20240303", "23",
    )  # fmt: skip
    assert first["stnIds"] == "108" and first["numOfRows"] == "20"


def test_asks_only_for_hours_after_the_last_one_held(server: KmaServer) -> None:
    server.observations[108] = hourly_observations(START, 72)
    frame = settings(server).fetch_after(pd.Timestamp("2024-03-02 05:00"))
    assert frame["date"].iloc[0] == pd.Timestamp("2024-03-02 06:00") and len(frame) == 42
    assert (server.requests[0]["startDt"], server.requests[0]["startHh"]) == ("20240302", "06")


def test_no_data_is_an_empty_frame_and_a_missing_value_is_nan(server: KmaServer) -> None:
    assert settings(server).fetch_after(None).empty  # resultCode 03 NODATA_ERROR
    server.observations[108] = [observation(START, None), observation(START.replace(hour=1), 1.5)]
    frame = settings(server).fetch_after(None)
    assert frame["temp"].isna().tolist() == [True, False]


def test_unregistered_key_is_one_line_with_the_code_and_never_shows_the_key(
    server: KmaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMA_SERVICE_KEY", "wrong-secret-key")
    with pytest.raises(KmaApiError) as raised:
        settings(server).fetch_after(None)
    message = str(raised.value)
    assert "resultCode 30 SERVICE_KEY_IS_NOT_REGISTERED_ERROR" in message
    assert "wrong-secret-key" not in message and "\n" not in message
    assert len(server.requests) == 1  # not retried: another try would not help


def test_encoded_key_is_decoded_once(server: KmaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.observations[108] = hourly_observations(START, 3)
    monkeypatch.setenv("KMA_SERVICE_KEY", quote(server.service_key, safe=""))
    assert len(settings(server).fetch_after(None)) == 3


def test_transient_errors_are_retried_then_reported(server: KmaServer) -> None:
    server.observations[108] = hourly_observations(START, 30)
    server.fail_next = [("code", "05"), ("http", 503)]
    assert len(settings(server, retries=2).fetch_after(None)) == 30

    server.fail_next = [("code", "05")] * 3
    with pytest.raises(KmaApiError, match="resultCode 05 SERVICETIMEOUT_ERROR"):
        settings(server, retries=1).fetch_after(None)


def test_quota_and_bad_parameters_name_the_code(server: KmaServer) -> None:
    server.fail_next = [("code", "22")]
    with pytest.raises(KmaApiError, match="resultCode 22 .*quota"):
        settings(server).fetch_after(None)
    server.fail_next = [("code", "10")]
    with pytest.raises(KmaApiError, match="resultCode 10 INVALID_REQUEST_PARAMETER_ERROR"):
        settings(server).fetch_after(None)


def test_a_missing_key_names_where_it_was_looked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMA_SERVICE_KEY", raising=False)
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "127.0.0.1:9")
    with pytest.raises(SourceError, match="no KMA service key in the environment variable"):
        KmaAsosSettings(url="http://127.0.0.1:9/x").fetch_after(None)


def test_an_unreachable_service_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMA_SERVICE_KEY", "k")
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "127.0.0.1")
    # Port 9 (discard) on loopback: nothing listens there.
    source = KmaAsosSettings(url="http://127.0.0.1:9/x", retries=0, start="2024-03-01",
                             end="2024-03-01")  # fmt: skip
    with pytest.raises(KmaApiError, match="cannot connect"):
        source.fetch_after(None)


def test_ingest_from_kma_is_idempotent(server: KmaServer, tmp_path: Path) -> None:
    server.observations[108] = hourly_observations(START, 48)
    dataset = DatasetSettings(uri=str(tmp_path / "seoul.parquet"))
    source = settings(server)
    assert commit(plan_ingest(dataset, source), dataset).rows_added == 48
    server.observations[108] = hourly_observations(START, 72)  # a day more arrives
    again = commit(plan_ingest(dataset, source), dataset)
    assert (again.rows_added, again.rows_after) == (24, 72)
    assert commit(plan_ingest(dataset, source), dataset).rows_added == 0
    held = read_dataset(dataset)
    assert held["date"].is_unique and len(held) == 72
