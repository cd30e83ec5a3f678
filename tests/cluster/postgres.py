"""A real PostgreSQL for the tests (Debian's postgresql-15), started and stopped by a fixture:
a fresh cluster in a temp directory (initdb), fsync off, listening on one address only, with
one database and one password user for MLflow. On the real node it listens on the bridge
address and lets the pod range in, so that pods reach it (tests/node/conftest.py).

PostgreSQL refuses to run as root: it runs as the `postgres` account Debian's package makes.
Nothing is left behind: stop() ends the server and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlkube.local import free_port
from tests.cluster.controlplane import BinariesMissing, ManagedProcess, spawn
from tests.cluster.objectstore import wait_listening

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # the system account of Debian's package
Spawn = Callable[..., ManagedProcess]


def postgres_binaries() -> Path:
    if not (PG_BIN / "postgres").exists():
        raise BinariesMissing(f"{PG_BIN}/postgres is missing: apt-get install postgresql-15")
    return PG_BIN


class Postgres:
    """One PostgreSQL server on `host`; `clients` are CIDRs allowed in by password besides
    loopback. `uri` is the SQLAlchemy URI of the database `database` for MLflow."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        clients: tuple[str, ...] = (),
        database: str = "mlflow",
        spawn_with: Spawn | None = None,
    ) -> None:
        self.host = host
        self.port = free_port()
        self.clients = clients
        self.database = database
        self.user = "mlflow"
        self.password = secrets.token_hex(12)
        # Not under a private temp dir: the postgres account must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="mlkube-postgres-"))
        self.data = self.root / "data"
        self._spawn = spawn_with or (
            lambda name, argv, **kw: spawn(name, argv, self.root / "postgres.log", **kw)
        )
        self.process: ManagedProcess | None = None

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def _as_postgres(self, *argv: str | Path, input: str | None = None) -> None:
        subprocess.run(
            [str(a) for a in argv], check=True, capture_output=True, text=True, input=input,
            user=PG_USER, group=PG_USER, cwd=self.root, timeout=120,
        )  # fmt: skip

    def start(self, timeout: float = 60) -> Postgres:
        pg = postgres_binaries()
        shutil.chown(self.root, PG_USER, PG_USER)
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        shutil.chown(password_file, PG_USER, PG_USER)
        self._as_postgres(
            pg / "initdb", "-D", self.data, "-U", self.user, f"--pwfile={password_file}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        if self.clients:
            with (self.data / "pg_hba.conf").open("a") as hba:
                for cidr in self.clients:
                    hba.write(f"host all all {cidr} scram-sha-256\n")
        argv = [
            pg / "postgres", "-D", self.data,
            "-c", f"listen_addresses={self.host}", "-p", str(self.port),
            "-c", f"unix_socket_directories={self.root}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=100", "-c", "shared_buffers=32MB",
        ]  # fmt: skip
        self.process = self._spawn("postgres", argv, user=PG_USER, group=PG_USER)
        wait_listening(self.process, self.host, self.port, timeout)
        self._as_postgres(
            pg / "createdb", "-h", self.root, "-p", str(self.port), "-U", self.user,
            self.database,
        )  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def query(self, sql: str) -> str:
        """One SQL statement through psql on the local socket; its unaligned output."""
        result = subprocess.run(
            [str(PG_BIN / "psql"), "-h", str(self.root), "-p", str(self.port), "-U", self.user,
             "-d", self.database, "-At", "-c", sql],
            check=True, capture_output=True, text=True, user=PG_USER, group=PG_USER,
            cwd=self.root, timeout=60,
        )  # fmt: skip
        return result.stdout.strip()

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: clients still connected (MLflow's
            # pools) are disconnected, where SIGTERM would wait for them.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.popen.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.popen.wait(30)
            self.process.stop()
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)
