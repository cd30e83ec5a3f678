"""`kma-asos`: hourly ASOS observations of the Korean Meteorological Administration.

The data.go.kr service `AsosHourlyInfoService/getWthrDataList` (what the original system
crawled every 6 hours, station 108 = Seoul). Request parameters: serviceKey, pageNo,
numOfRows, dataType=JSON, dataCd=ASOS, dateCd=HR, startDt/startHh, endDt/endHh (YYYYMMDD,
HH), stnIds. Answer: `response.header.resultCode/resultMsg` ("00" = NORMAL_SERVICE) and
`response.body.items.item[]` with `tm` ("YYYY-MM-DD HH:MM", Korean standard time), `stnId`,
`ta` (air temperature, °C), `hm` (humidity, %), `ws` (wind speed, m/s), ... as strings
(empty when not observed), plus `body.totalCount` for paging. The service holds data up to
yesterday. Errors come either in that header or, from the data.go.kr gateway (key not
registered, quota), as an XML `OpenAPI_ServiceResponse` with `returnReasonCode`.

The service key comes from an environment variable (default KMA_SERVICE_KEY) or from a
Kubernetes Secret of the flow's own namespace; it is never logged or put in an error
message. It travels in the query string, so the endpoint is pinned: the flow's parameters
(which whoever may start a flow run can change) may only name a host the worker's
environment allows (MLKUBE_KMA_ALLOWED_HOSTS, default apis.data.go.kr, https), and every
request, redirects included, is checked against that list before it is sent.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import ipaddress
import math
import os
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

import pandas as pd
from pydantic import Field, field_validator

from mlkube.api.common import CamelModel
from mlkube.flows.sources.base import (
    TIME_COLUMN,
    VALUE_COLUMN,
    SourceError,
    SourceSettings,
    empty_frame,
)

DEFAULT_URL = "https://apis.data.go.kr/1360000/AsosHourlyInfoService/getWthrDataList"
# Set by whoever runs the worker, not by the flow's parameters: comma-separated `host` or
# `host:port` entries the key may be sent to (replacing the default).
ALLOWED_HOSTS_ENV = "MLKUBE_KMA_ALLOWED_HOSTS"
DEFAULT_ALLOWED_HOSTS = ("apis.data.go.kr",)
DEFAULT_PORTS = {"https": 443, "http": 80}
KST = ZoneInfo("Asia/Seoul")
MAX_ROWS_PER_PAGE = 999
# The common result codes of data.go.kr services.
RESULT_CODES = {
    "00": "NORMAL_SERVICE",
    "01": "APPLICATION_ERROR",
    "02": "DB_ERROR",
    "03": "NODATA_ERROR",
    "04": "HTTP_ERROR",
    "05": "SERVICETIMEOUT_ERROR",
    "10": "INVALID_REQUEST_PARAMETER_ERROR",
    "11": "NO_MANDATORY_REQUEST_PARAMETERS_ERROR",
    "12": "NO_OPENAPI_SERVICE_ERROR",
    "20": "SERVICE_ACCESS_DENIED_ERROR",
    "21": "TEMPORARILY_DISABLE_THE_SERVICEKEY_ERROR",
    "22": "LIMITED_NUMBER_OF_SERVICE_REQUESTS_EXCEEDS_ERROR",
    "30": "SERVICE_KEY_IS_NOT_REGISTERED_ERROR",
    "31": "DEADLINE_HAS_EXPIRED_ERROR",
    "32": "UNREGISTERED_IP_ERROR",
    "33": "UNSIGNED_CALL_ERROR",
    "99": "UNKNOWN_ERROR",
}
NO_DATA = "03"
# Worth another try: the provider or the gateway was slow or down for a moment.
TRANSIENT_CODES = {"01", "02", "04", "05"}
HINTS = {
    "20": "this key is not approved for AsosHourlyInfoService",
    "22": "the key's daily request quota is used up",
    "30": "check the service key (use the Decoding key, or the Encoding one as given)",
    "31": "the service key has expired",
    "32": "this machine's IP is not registered for the key",
}
# Observation columns kept besides `ta` (all numeric).
EXTRA_FIELDS = {"hm": "humidity", "ws": "wind_speed", "pa": "pressure", "rn": "rain"}


class KmaApiError(SourceError):
    """The API answered with an error code (or not at all)."""

    def __init__(self, message: str, code: str | None = None, transient: bool = False):
        super().__init__(message)
        self.code = code
        self.transient = transient


class SecretKeyRef(CamelModel):
    """A key of a Kubernetes Secret of the flow's own namespace."""

    name: str
    key: str = "serviceKey"
    namespace: str | None = Field(
        default=None, description="Only the flow's own namespace (the default) is read."
    )


class KmaAsosSettings(SourceSettings):
    kind: Literal["kma-asos"] = "kma-asos"
    station_id: int = Field(default=108, ge=1, description="ASOS station (108 = Seoul).")
    url: str = Field(
        default=DEFAULT_URL,
        description=f"Endpoint; its host must be one of {ALLOWED_HOSTS_ENV} (the worker's).",
    )
    service_key_env: str = Field(default="KMA_SERVICE_KEY", min_length=1)
    service_key_secret: SecretKeyRef | None = Field(
        default=None, description="Read the key from this Secret when the variable is unset."
    )
    start: dt.date | None = Field(
        default=None, description="First day fetched into an empty dataset (default 90 days ago)."
    )
    end: dt.date | None = Field(
        default=None, description="Last day fetched (inclusive); default yesterday in Korea."
    )
    page_size: int = Field(default=MAX_ROWS_PER_PAGE, ge=1, le=MAX_ROWS_PER_PAGE)
    timeout_seconds: float = Field(default=30.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_seconds: float = Field(default=2.0, ge=0)

    @field_validator("url")
    @classmethod
    def _allowed_url(cls, url: str) -> str:
        problem = url_problem(url)
        if problem:
            raise ValueError(problem)
        return url

    @property
    def unit(self) -> str:
        return "°C"

    @property
    def plausible_range(self) -> tuple[float, float]:
        # Korea's records are about -33 and +41 °C.
        return (-45.0, 50.0)

    def describe(self) -> str:
        return f"KMA ASOS hourly, station {self.station_id}"

    def fetch_after(self, last: pd.Timestamp | None) -> pd.DataFrame:
        yesterday = dt.datetime.now(KST).date() - dt.timedelta(days=1)
        end_day = min(self.end or yesterday, yesterday)
        if last is None:
            begin = pd.Timestamp(self.start or end_day - dt.timedelta(days=89))
        else:
            begin = last + pd.Timedelta(hours=1)
        end = pd.Timestamp(end_day) + pd.Timedelta(hours=23)
        if begin > end:
            return empty_frame()
        items = fetch_items(self, service_key(self), begin, end)
        return items_to_frame(items)


def allowed_hosts() -> list[str]:
    """The worker's list (lowercase `host` or `host:port`), read at each call."""
    entries = [e.strip().lower() for e in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")]
    return [e for e in entries if e] or list(DEFAULT_ALLOWED_HOSTS)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def url_problem(url: str) -> str | None:
    """Why the service key must not be sent to `url`, or None. Never echoes the query."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a valid URL"
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return "must be an https:// URL"
    port = port or DEFAULT_PORTS[scheme]
    where = f"{scheme}://{host}:{port}"
    # Plain http would show the key to the network; loopback never leaves the machine.
    if scheme == "http" and not is_loopback(host):
        return f"{where}: the service key is only sent over https"
    allowed = allowed_hosts()
    if host not in allowed and f"{host}:{port}" not in allowed:
        return f"{where} is not an allowed host ({ALLOWED_HOSTS_ENV}: {', '.join(allowed)})"
    return None


def check_request(request: Any) -> None:
    """httpx request hook: runs before every request, so a redirect cannot take the key
    (or the next page's request) to a host the worker does not allow."""
    problem = url_problem(str(request.url))
    if problem:
        raise SourceError(f"source.url: refused to send the request: {problem}")


def service_key(settings: KmaAsosSettings) -> str:
    """From the environment, else the Secret; data.go.kr's "Encoding" key is decoded once so
    that the HTTP client's own encoding does not encode it twice."""
    key = os.environ.get(settings.service_key_env, "").strip()
    if not key and settings.service_key_secret is not None:
        key = read_secret(settings.service_key_secret).strip()
    if not key:
        where = f"environment variable {settings.service_key_env}"
        if settings.service_key_secret is not None:
            ref = settings.service_key_secret
            where += f" or Secret {ref.name} (key {ref.key})"
        raise SourceError(f"source.serviceKey: no KMA service key in the {where}")
    return unquote(key) if "%" in key else key


def read_secret(ref: SecretKeyRef) -> str:
    from kubernetes import client

    from mlkube.kube_config import api_client, current_namespace

    namespace = current_namespace()
    # The flow's parameters are not the place to pick whose Secrets it reads.
    if ref.namespace is not None and ref.namespace != namespace:
        raise SourceError(
            f"source.serviceKeySecret.namespace: Secrets are read only from the flow's own "
            f"namespace ({namespace}), not {ref.namespace}"
        )
    try:
        with api_client() as api:
            secret = client.CoreV1Api(api).read_namespaced_secret(ref.name, namespace)
    except client.exceptions.ApiException as error:
        raise SourceError(
            f"source.serviceKeySecret: cannot read Secret {namespace}/{ref.name}: "
            f"{error.status} {error.reason}"
        ) from None
    data = secret.data or {}
    if ref.key not in data:
        raise SourceError(
            f"source.serviceKeySecret: Secret {namespace}/{ref.name} has no key {ref.key!r}"
        )
    return base64.b64decode(data[ref.key]).decode()


def request_params(
    settings: KmaAsosSettings, key: str, begin: pd.Timestamp, end: pd.Timestamp, page: int
) -> dict[str, str]:
    return {
        "serviceKey": key,
        "pageNo": str(page),
        "numOfRows": str(settings.page_size),
        "dataType": "JSON",
        "dataCd": "ASOS",
        "dateCd": "HR",
        "startDt": begin.strftime("%Y%m%d"),
        "startHh": begin.strftime("%H"),
        "endDt": end.strftime("%Y%m%d"),
        "endHh": end.strftime("%H"),
        "stnIds": str(settings.station_id),
    }


def fetch_items(
    settings: KmaAsosSettings, key: str, begin: pd.Timestamp, end: pd.Timestamp
) -> list[dict[str, Any]]:
    """Every item of the range, page by page, until `totalCount` are in."""
    import httpx

    items: list[dict[str, Any]] = []
    hooks = {"request": [check_request]}
    with httpx.Client(
        timeout=settings.timeout_seconds, follow_redirects=True, event_hooks=hooks
    ) as http:
        page, pages = 1, 1
        while page <= pages:
            params = request_params(settings, key, begin, end, page)
            body = with_retries(settings, functools.partial(get_page, http, settings.url, params))
            if body is None:  # NODATA_ERROR: nothing in the range
                return items
            page_items = body_items(body)
            total = int(body.get("totalCount") or 0)
            pages = max(1, math.ceil(total / settings.page_size))
            items.extend(page_items)
            if not page_items:
                break
            page += 1
    return items


def with_retries(
    settings: KmaAsosSettings, call: Callable[[], dict[str, Any] | None]
) -> dict[str, Any] | None:
    attempt = 0
    while True:
        try:
            return call()
        except KmaApiError as error:
            if not error.transient or attempt >= settings.retries:
                raise
        attempt += 1
        # Back off before asking a struggling service again.
        time.sleep(settings.retry_backoff_seconds * attempt)


def get_page(http: Any, url: str, params: dict[str, str]) -> dict[str, Any] | None:
    """One page's `response.body`; None for NODATA_ERROR; KmaApiError for the rest."""
    import httpx

    try:
        answer = http.get(url, params=params)
    except httpx.TimeoutException:
        raise KmaApiError("KMA ASOS API: no answer in time", transient=True) from None
    except httpx.TransportError as error:
        raise KmaApiError(
            f"KMA ASOS API: cannot connect: {type(error).__name__}", transient=True
        ) from None
    text = answer.text
    if text.lstrip().startswith("<"):
        raise_for_xml(text, answer.status_code)
    if answer.status_code >= 400:
        raise KmaApiError(
            f"KMA ASOS API: HTTP {answer.status_code}", transient=answer.status_code >= 500
        )
    try:
        document = answer.json()
        header = document["response"]["header"]
    except (ValueError, KeyError, TypeError):
        raise KmaApiError("KMA ASOS API: the answer is not the documented JSON") from None
    code = str(header.get("resultCode", ""))
    if code == NO_DATA:
        return None
    if code != "00":
        raise result_error(code, str(header.get("resultMsg", "")))
    body = document["response"].get("body") or {}
    return body if isinstance(body, dict) else {}


def result_error(code: str, message: str) -> KmaApiError:
    name = message or RESULT_CODES.get(code, "unknown code")
    hint = f" ({HINTS[code]})" if code in HINTS else ""
    return KmaApiError(
        f"KMA ASOS API: resultCode {code} {name}{hint}", code, transient=code in TRANSIENT_CODES
    )


def raise_for_xml(text: str, status: int) -> None:
    """The gateway answers in XML whatever dataType says (and so may the service)."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        raise KmaApiError(
            f"KMA ASOS API: HTTP {status}, not JSON", transient=status >= 500
        ) from None
    code = root.findtext(".//returnReasonCode") or root.findtext(".//resultCode") or ""
    message = (
        root.findtext(".//returnAuthMsg")
        or root.findtext(".//resultMsg")
        or root.findtext(".//errMsg")
        or ""
    )
    if code == NO_DATA:
        return
    raise result_error(code.strip(), message.strip())


def body_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("items")
    # An empty result comes as "" rather than {"item": []}; one row may come unwrapped.
    if not isinstance(items, dict):
        return []
    item = items.get("item") or []
    return [item] if isinstance(item, dict) else list(item)


def number(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def items_to_frame(items: list[dict[str, Any]]) -> pd.DataFrame:
    if not items:
        return empty_frame()
    try:
        times = pd.to_datetime([item["tm"] for item in items], format="%Y-%m-%d %H:%M")
    except (KeyError, ValueError) as error:
        raise SourceError(f"KMA ASOS API: an item has no valid tm: {error}") from None
    frame = pd.DataFrame({TIME_COLUMN: times, VALUE_COLUMN: [number(i.get("ta")) for i in items]})
    frame["station_id"] = [int(number(i.get("stnId"))) if i.get("stnId") else -1 for i in items]
    for field, column in EXTRA_FIELDS.items():
        frame[column] = [number(i.get(field)) for i in items]
    return frame
