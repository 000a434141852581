"""A PostgreSQL server of the test session's own: initdb in a temporary directory, postgres on a free port.

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

INSTALL_HINT = "PostgreSQL's initdb and postgres were not found: run scripts/install-postgres (as root)"

#: The signal for each of ``pg_ctl stop``'s modes (PostgreSQL's "Shutting Down the Server").
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def find_binaries() -> Path | None:
    """The folder of initdb and postgres: Debian's /usr/lib/postgresql/N/bin (the newest), else PATH."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "postgres", os.X_OK):
            return Path(folder)
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
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
        self.process: subprocess.Popen[bytes] | None = None

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = self._command(*args)
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

    def _command(self, *args: str) -> list[str]:
        """A command of PostgreSQL's binaries, as the ``postgres`` user when root."""
        command = [str(self.bin / args[0]), *args[1:]]
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _listen(self) -> str:
        return "127.0.0.1"

    def start(self, timeout: float = 30) -> PostgresServer:
        """Run ``postgres`` in the foreground, a child of this process in its process group.

        Not ``pg_ctl start``, which detaches the server into a session of its own: when
        scripts/mutate.py kills the group of a test run that timed out, the server must go too.
        Ready when the server marks its ``postmaster.pid`` "ready", as ``pg_ctl -w`` waits."""
        with contextlib.suppress(FileNotFoundError):
            (self.data / "postmaster.pid").unlink()  # a server killed without a chance to remove it
        command = self._command(
            "postgres", "-D", str(self.data), "-p", str(self.port), "-k", str(self.sockets),
            "-c", f"listen_addresses={self._listen()}", "-c", "fsync=on",
        )  # fmt: skip
        with (self.base / "log").open("ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base)
        deadline = time.monotonic() + timeout
        while not self._ready():
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout=0.01)  # returns at once if the server exits
                msg = f"{' '.join(command)} exited with {code}: {self._log_tail()}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                self.stop()
                msg = f"PostgreSQL was not ready within {timeout} s: {self._log_tail()}"
                raise RuntimeError(msg)
        return self

    def _ready(self) -> bool:
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        # Line 8 is the postmaster's status (PostgreSQL 10 and later): "ready" once it accepts connections.
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _log_tail(self) -> str:
        try:
            return (self.base / "log").read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"

    def stop(self, mode: str = "fast", timeout: float = 10) -> None:
        """Stop the server by its PID: SIGTERM, SIGINT or SIGQUIT for ``pg_ctl``'s modes smart, fast
        and immediate, then SIGKILL to its process group's server processes if it is not gone in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        pid = self.postmaster_pid()
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, STOP_SIGNALS[mode])
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in (pid, process.pid):
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
            process.wait(timeout=timeout)

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
