"""A PostgreSQL server of the test session's own: initdb in a temporary directory, pg_ctl on a free port.

As root it runs as the ``postgres`` user (PostgreSQL refuses to run as root), through
``runuser``. The server listens on 127.0.0.1 and on a Unix socket in its own directory,
trusts every local connection (user ``wsecho``) and keeps ``fsync`` on, so that the crash
tests test durability. Each test gets a schema of its own (:meth:`PostgresServer.fresh_url`),
which is much faster than a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg

INSTALL_HINT = "PostgreSQL's initdb and pg_ctl were not found: run scripts/install-postgres (as root)"


def find_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: Debian's /usr/lib/postgresql/N/bin (the newest), else PATH."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "pg_ctl", os.X_OK):
            return Path(folder)
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster in ``base`` (a fresh directory), started and stopped by its owner."""

    def __init__(self, base: Path, binaries: Path) -> None:
        self.base = base
        self.bin = binaries
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.port = free_port()
        self._names = itertools.count(1)

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if done.returncode != 0:
            msg = f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
            raise RuntimeError(msg)

    def init(self) -> PostgresServer:
        self.sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sockets, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "wsecho", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.base / "log"), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``; then make sure the postmaster is gone (SIGKILL if not)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, database: str = "postgres", schema: str | None = None) -> str:
        url = f"postgresql://wsecho@127.0.0.1:{self.port}/{database}"
        return url if schema is None else f"{url}?options=-csearch_path%3D{schema}"

    def fresh_url(self) -> str:
        """The URL of a new, empty schema: a database of the test's own, as far as wsecho sees."""
        schema = f"t{next(self._names)}_{os.getpid()}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.url(schema=schema)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (a child of ours that exited) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
