"""Where an object of a SQL-storage class keeps its own SQLite database (``ctx.storage.sql``).

Each object gets its own database: a file ``objects/<namespace>/<id>.sqlite3`` under the data
directory (:class:`FileDatabases`), or, with ``--data-dir :memory:``, an in-memory database
kept for the life of the process (:class:`MemoryDatabases`). A database is opened when the
object first uses its storage after waking and closed when it hibernates, so open files grow
with the active objects, not with all of them. PostgreSQL has none (see decision 0008).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import quote

from wsecho.backends.base import Backend, MemoryBackend, SQLiteBackend
from wsecho.core.errors import StorageError

T = TypeVar("T")

#: The files SQLite keeps beside a database in WAL mode.
_SIDE_FILES = ("-wal", "-shm", "-journal")
#: Threads that commit objects' databases: each commit is an fsync of its own file, so a few
#: run at once (the event loop only waits for them when a turn's output does).
COMMIT_THREADS = 4


class ObjectDatabases(Protocol):
    """Opens, closes and removes objects' own databases."""

    def open(self, namespace: str, hex_id: str) -> sqlite3.Connection:
        """The object's database, created if it does not exist."""
        ...

    def close(self, namespace: str, hex_id: str, conn: sqlite3.Connection) -> None: ...

    def remove(self, namespace: str, hex_id: str, conn: sqlite3.Connection) -> None:
        """Close the (empty) database and delete it: the object stores nothing any more."""
        ...

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a commit) where it does not block the event loop."""
        ...

    def shutdown(self) -> None:
        """The server stops: every database is closed; stop the commit threads."""
        ...


def connect(target: str | Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: the storage begins and commits its transactions itself (one per
    # turn). cached_statements=0: each statement is prepared again, so the authorizer sees
    # every statement a handler runs (a cached one would skip it).
    conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, cached_statements=0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    # As Cloudflare's: foreign keys are enforced.
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class FileDatabases:
    """One SQLite file per object under ``data_dir/objects``."""

    def __init__(self, data_dir: Path | str, synchronous: str = "FULL") -> None:
        self.root = Path(data_dir) / "objects"
        self.synchronous = synchronous
        self._threads = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="wsecho-object-db")
        #: Closes still running, by object: the next open or remove of that file waits for its
        #: close (a close that ends after a removal would delete the next database's WAL).
        self._closing: dict[tuple[str, str], Future[None]] = {}

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=True)

    def path(self, namespace: str, hex_id: str) -> Path:
        return self.root / quote(namespace, safe="") / f"{hex_id}.sqlite3"

    def _closed(self, namespace: str, hex_id: str) -> None:
        closing = self._closing.pop((namespace, hex_id), None)
        if closing is not None:
            closing.result()  # at most one checkpoint, and only when an object wakes right away

    def open(self, namespace: str, hex_id: str) -> sqlite3.Connection:
        self._closed(namespace, hex_id)
        path = self.path(namespace, hex_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return connect(path, self.synchronous)
        except (OSError, sqlite3.Error) as exc:
            msg = f"cannot open the object database {path}: {exc}"
            raise StorageError(msg) from exc

    def close(self, namespace: str, hex_id: str, conn: sqlite3.Connection) -> None:
        # Closing checkpoints the WAL into the file (an fsync): on a commit thread, not the
        # event loop. It rolls back a transaction still open (a reset object's turn).
        closing = self._threads.submit(conn.close)
        key = (namespace, hex_id)
        self._closing[key] = closing
        loop = asyncio.get_running_loop()
        closing.add_done_callback(lambda f: loop.call_soon_threadsafe(self._forget_close, key, f))

    def _forget_close(self, key: tuple[str, str], closing: Future[None]) -> None:
        if self._closing.get(key) is closing:
            del self._closing[key]

    def remove(self, namespace: str, hex_id: str, conn: sqlite3.Connection) -> None:
        self._closed(namespace, hex_id)
        conn.close()
        path = self.path(namespace, hex_id)
        for name in (path, *(path.with_name(path.name + side) for side in _SIDE_FILES)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


class MemoryDatabases:
    """In-memory databases that live as long as the process (``--data-dir :memory:``)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], sqlite3.Connection] = {}

    def open(self, namespace: str, hex_id: str) -> sqlite3.Connection:
        key = (namespace, hex_id)
        if key not in self._open:
            self._open[key] = connect(":memory:", "OFF")
        return self._open[key]

    def close(self, namespace: str, hex_id: str, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.rollback()  # what a closed file would do: the uncommitted turn is lost

    def remove(self, namespace: str, hex_id: str, conn: sqlite3.Connection) -> None:
        self._open.pop((namespace, hex_id), None)
        conn.close()

    async def run(self, fn: Callable[[], T]) -> T:
        return fn()  # no disk to wait for

    def shutdown(self) -> None:
        """The databases go with the server (their data lives only in memory)."""
        for conn in self._open.values():
            conn.close()
        self._open.clear()


def databases_for(backend: Backend) -> ObjectDatabases | None:
    """Where ``backend``'s objects keep their own databases; None if it has no such place."""
    if isinstance(backend, SQLiteBackend):
        return FileDatabases(backend.data_dir, backend.synchronous)
    if isinstance(backend, MemoryBackend):
        return MemoryDatabases()
    return None
