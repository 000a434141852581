"""A real PostgreSQL server for the tests that need one, started by the test session itself.

``initdb`` and ``pg_ctl`` run in a temporary directory on a free port (as the ``postgres``
user when the tests run as root, which PostgreSQL requires); the server is stopped, by its
PID, when the session ends. ``scripts/install-postgres`` installs Debian's package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """One server: ``dsn`` (database ``postgres``, user ``wsecho``, trust on loopback)."""

    def __init__(self) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            msg = "PostgreSQL is not installed: run scripts/install-postgres (as root)"
            if os.geteuid() == 0:
                pytest.fail(msg)
            pytest.skip(msg)
        self.root = Path(tempfile.mkdtemp(prefix="wsecho-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(self.root, "postgres")
        self.root.chmod(0o700)
        run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, timeout=60)  # noqa: E731
        run(str(bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "wsecho", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        run(str(bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        self.pg_ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(self.data)]
        self.dsn = f"postgresql://wsecho@127.0.0.1:{self.port}/postgres"

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def stop(self) -> None:
        pid = self.pid()
        subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60, check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(postgres):
    """A fresh database per test (dropped afterwards)."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres.dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_counter = iter(range(1_000_000))
