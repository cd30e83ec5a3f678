"""A real S3-compatible object store for the tests: versitygw (built from its Go module by
build.sh) with its posix backend, buckets being folders under a data directory of its own.

On loopback for the integration tests (tests/fixtures/services.py); on the real node it runs
on the host bound to the bridge address, as the API server does, so that pods reach it, and
in the node's cgroup, so that the node's guard sees anything it sends (tests/node/conftest.py).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlkube.local import free_port
from tests.cluster.controlplane import BinariesMissing, ManagedProcess, binaries_dir, spawn

Spawn = Callable[..., ManagedProcess]


def versitygw_binary() -> Path:
    path = binaries_dir() / "versitygw"
    if not path.exists():
        raise BinariesMissing(f"{path} is missing: run `make k8s-binaries`")
    return path


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_listening(process: ManagedProcess, host: str, port: int, timeout: float) -> None:
    """Until `process` accepts connections on host:port; fails early if it exits."""
    deadline = time.monotonic() + timeout
    while not listening(host, port):
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name} not listening on {host}:{port} in {timeout}s")
        time.sleep(0.1)


class ObjectStore:
    """versitygw on `host`, with one root account (its keys are `access_key`/`secret_key`).
    `spawn` starts the process (the node's, to run it in the node's cgroup)."""

    def __init__(self, host: str = "127.0.0.1", *, spawn_with: Spawn | None = None) -> None:
        self.host = host
        self.port = free_port()
        self.access_key = "mlkube" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.root = Path(tempfile.mkdtemp(prefix="mlkube-s3-"))
        self.data = self.root / "data"
        self._spawn = spawn_with or (
            lambda name, argv, **kw: spawn(name, argv, self.root / "versitygw.log", **kw)
        )
        self.process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables boto3, s3fs and MLflow read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            # No credentials chain beyond these (the instance metadata address is off-limits).
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> ObjectStore:
        self.data.mkdir(parents=True)
        argv: Sequence[str | Path] = [
            versitygw_binary(),
            "--access", self.access_key,
            "--secret", self.secret_key,
            "--port", f"{self.host}:{self.port}",
            "--quiet",
            "posix", self.data,
        ]  # fmt: skip
        self.process = self._spawn("versitygw", argv)
        wait_listening(self.process, self.host, self.port, timeout)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        """A bucket (created if missing); its s3:// URI."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def put(self, bucket: str, key: str, source: Path) -> str:
        """Upload a file; its s3:// URI."""
        self.bucket(bucket)
        self.client().upload_file(str(source), bucket, key)
        return f"s3://{bucket}/{key}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        ]
