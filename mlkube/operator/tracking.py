"""Which MLflow a resource's reads go to, and with whose credentials. Pure.

A spec's `mlflow.trackingUri` is the user's input: the operator calls it only when its
host is one the admin allows (MLKUBE_OPERATOR_MLFLOW_ALLOWED_HOSTS; the host and port of
the operator's own tracking URI always are), and sends its own MLflow credentials only to its
own tracking URI. Otherwise a TrainingRun could make the operator fetch any URL with its
token and echo the answer into the resource's status.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from pydantic import BaseModel

FIELD = "spec.mlflow.trackingUri"
# The condition/event reason when a spec's tracking URI is refused.
NOT_ALLOWED = "TrackingUriNotAllowed"


class TrackingUriNotAllowed(ValueError):
    """A spec's tracking URI the operator will not use; the message is one line, ours."""


class TrackingTarget(BaseModel):
    uri: str
    # True only for the operator's own tracking URI: its credentials go nowhere else.
    credentials: bool


def _host_port(parts: urllib.parse.SplitResult) -> tuple[str, int | None]:
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or "").lower(), port


def _allowed(host: str, port: int | None, entries: Iterable[str]) -> bool:
    """An entry is `host` (any port) or `host:port`; hosts compare case-insensitively."""
    for entry in entries:
        name, _, entry_port = entry.strip().lower().rpartition(":")
        if not name or not entry_port.isdigit():
            name, entry_port = entry.strip().lower(), ""
        if name == host and (not entry_port or int(entry_port) == port):
            return True
    return False


def tracking_target(
    spec_uri: str | None, own_uri: str, allowed_hosts: Iterable[str]
) -> TrackingTarget:
    """The MLflow to read for a resource; TrackingUriNotAllowed names why not."""
    own = own_uri.rstrip("/")
    if not spec_uri or spec_uri.rstrip("/") == own:
        return TrackingTarget(uri=own, credentials=True)
    parts = urllib.parse.urlsplit(spec_uri)
    if parts.scheme not in ("http", "https"):
        # file: and sqlite: would be read from the operator's own file system.
        raise TrackingUriNotAllowed(f"{FIELD}: only http and https tracking URIs are allowed")
    if parts.username is not None or parts.password is not None:
        raise TrackingUriNotAllowed(f"{FIELD}: credentials in the URI are not allowed")
    if parts.query or parts.fragment or "#" in spec_uri or "?" in spec_uri:
        # A '#' would turn the API path the operator appends into a fragment.
        raise TrackingUriNotAllowed(f"{FIELD}: a query or fragment ('?', '#') is not allowed")
    host, port = _host_port(parts)
    own_parts = urllib.parse.urlsplit(own)
    if not host or not (
        _host_port(own_parts) == (host, port) or _allowed(host, port, allowed_hosts)
    ):
        raise TrackingUriNotAllowed(
            f"{FIELD}: host {host!r} is not one the operator may call (operator.mlflowAllowedHosts)"
        )
    return TrackingTarget(uri=spec_uri.rstrip("/"), credentials=False)
