"""Loaded by every Python process of the test session (PYTHONPATH): refuse and record any
connection or name lookup that would leave loopback, so a test can fail on it."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

LOG_ENV = "MLKUBE_NETGUARD_LOG"
# Comma-separated networks on this machine that count as local too: the test node's bridge
# and Service ranges (tests/cluster/node.py), which never leave the machine.
ALLOW_ENV = "MLKUBE_NETGUARD_ALLOW"
LOCAL_NAMES = {"localhost", "ip6-localhost", "", None}


def _allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(n.strip())
        for n in os.environ.get(ALLOW_ENV, "").split(",")
        if n.strip()
    ]


def _is_loopback(host: Any) -> bool:
    if host in LOCAL_NAMES:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return str(host).endswith(".localhost")
    return address.is_loopback or any(address in net for net in _allowed_networks())


def _record(what: str, log_path: str) -> None:
    line = f"{os.getpid()} {' '.join(sys.argv[:2])[:200]}: {what}\n"
    with open(log_path, "a") as log:
        log.write(line)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    log_path = os.environ.get(LOG_ENV)
    if not log_path:
        return
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _record(f"connect {address[0]}:{address[1]}", log_path)
            raise ConnectionRefusedError(f"netguard: {address[0]} is beyond loopback")
    elif event == "socket.getaddrinfo":
        host = args[0]
        if not _is_loopback(host) and host != socket.gethostname():
            _record(f"lookup {host!r}", log_path)
            raise socket.gaierror(socket.EAI_NONAME, f"netguard: no lookups of {host!r}")


def install() -> None:
    sys.addaudithook(_hook)


if os.environ.get(LOG_ENV):
    install()
