"""Storage backends: the small interface objects' storage runs on, in SQLite and in memory.

A backend stores encoded values (see :mod:`wsecho.api.codec`) by ``(object, key)`` and
one alarm per object. Writes arrive as :class:`Batch` lists, and a backend applies
every batch of one ``commit`` call in one transaction: that is what makes a
handler's writes atomic and lets many objects share one fsync.

:class:`SQLiteBackend` keeps the event loop free: every SQLite call runs on one
of two threads (a writer and a reader, each with its own connection; WAL mode
lets the reader work while the writer commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.resources
import logging
import os
import re
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from wsecho.core.alarms import AlarmRow
from wsecho.core.batches import Batch, entry_bytes
from wsecho.core.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_FILE = "wsecho.sqlite3"
LOCK_FILE = "wsecho.lock"


class Backend(Protocol):
    """What storage needs from a place to keep data."""

    async def open(self) -> list[AlarmRow]:
        """Get ready; return every stored alarm."""
        ...

    async def stored_alarms(self) -> list[AlarmRow]:
        """Every stored alarm (a cluster member loads those of the slots it takes)."""
        ...

    async def read(self, obj: str, keys: list[str]) -> dict[str, bytes]: ...

    async def scan(
        self,
        obj: str,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]:
        """Keys in ``[start, end)`` in key order (descending if ``reverse``), at most ``limit``."""
        ...

    async def commit(self, batches: list[Batch]) -> dict[str, int]:
        """Apply every batch in one transaction; durable when this returns.

        Returns by how many bytes each object's usage changed (see :meth:`usage`)."""
        ...

    async def usage(self, obj: str | None) -> int:
        """Bytes stored by ``obj`` (its keys in UTF-8 plus its encoded values), or by all objects."""
        ...

    async def close(self) -> None: ...


def _in_range(key: str, start: str | None, end: str | None) -> bool:
    return (start is None or key >= start) and (end is None or key < end)


class MemoryBackend:
    """Everything in a dict: for tests, and for ``--data-dir :memory:`` (nothing survives a restart)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, bytes]] = {}
        self.alarms: dict[str, AlarmRow] = {}
        self.commits = 0
        self._usage: dict[str, int] = {}

    async def open(self) -> list[AlarmRow]:
        return list(self.alarms.values())

    async def stored_alarms(self) -> list[AlarmRow]:
        return list(self.alarms.values())

    async def read(self, obj: str, keys: list[str]) -> dict[str, bytes]:
        rows = self.data.get(obj, {})
        return {k: rows[k] for k in keys if k in rows}

    async def scan(
        self,
        obj: str,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]:
        rows = self.data.get(obj, {})
        keys = sorted((k for k in rows if _in_range(k, start, end)), reverse=reverse)
        if limit is not None:
            keys = keys[:limit]
        return [(k, rows[k]) for k in keys]

    async def commit(self, batches: list[Batch]) -> dict[str, int]:
        changes: dict[str, int] = {}
        for batch in batches:
            obj = batch.object
            rows = self.data.setdefault(obj, {})
            change = 0
            if batch.clear:
                change -= self._usage.get(obj, 0)
                rows.clear()
            for key, value in batch.writes.items():
                old = rows.pop(key, None)
                if old is not None:
                    change -= entry_bytes(key, old)
                if value is not None:
                    rows[key] = value
                    change += entry_bytes(key, value)
            if not rows:
                del self.data[obj]
            usage = self._usage.get(obj, 0) + change
            if usage:
                self._usage[obj] = usage
            else:
                self._usage.pop(obj, None)
            changes[obj] = changes.get(obj, 0) + change
            if isinstance(batch.alarm, AlarmRow):
                self.alarms[batch.object] = batch.alarm
            elif batch.alarm is None:
                self.alarms.pop(batch.object, None)
        self.commits += 1
        return changes

    async def usage(self, obj: str | None) -> int:
        return sum(self._usage.values()) if obj is None else self._usage.get(obj, 0)

    async def close(self) -> None:
        pass


def scan_query(
    mark: str,
    obj: str,
    start: str | None,
    end: str | None,
    limit: int | None,
    reverse: bool,
    key: Callable[[str], object],
) -> tuple[str, list[object]]:
    """The SQL (with ``mark`` for each parameter) and the arguments of a :meth:`Backend.scan`;
    ``key`` turns a key into its column's value."""
    sql = [f"SELECT key, value FROM kv WHERE object = {mark}"]
    args: list[object] = [obj]
    if start is not None:
        sql.append(f"AND key >= {mark}")
        args.append(key(start))
    if end is not None:
        sql.append(f"AND key < {mark}")
        args.append(key(end))
    sql.append("ORDER BY key DESC" if reverse else "ORDER BY key")
    if limit is not None:
        sql.append(f"LIMIT {mark}")
        args.append(limit)
    return " ".join(sql), args


def migrations(dialect: str = "sqlite") -> list[tuple[int, str, str]]:
    """The schema files shipped for ``dialect``: ``(version, name, sql)`` in order.

    SQLite's are in ``wsecho/backends/schema``, PostgreSQL's in ``schema/postgres``."""
    folder = importlib.resources.files("wsecho.backends").joinpath("schema")
    if dialect != "sqlite":
        folder = folder.joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_.*\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def lock_data_dir(data_dir: Path) -> int:
    """Create ``data_dir`` if needed and take its lock; return the descriptor that holds it.

    The lock (``flock``) belongs to the open file: it is held while any process that
    inherited the descriptor lives, so a new server cannot open the directory while a
    worker of the old one still writes to it.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the data directory {data_dir}: {exc.strerror}"
        raise StorageError(msg) from exc
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        msg = f"the data directory {data_dir} is in use by another wsecho process"
        raise StorageError(msg) from None
    return fd


class SQLiteBackend:
    """SQLite in WAL mode in ``data_dir``, with a lock so that one server owns it."""

    def __init__(self, data_dir: Path | str, synchronous: str = "FULL", *, lock: bool = True) -> None:
        """``lock=False``: the caller holds the directory's lock already (the supervisor of
        ``--workers N`` takes it with :func:`lock_data_dir` and its workers inherit it)."""
        self.data_dir = Path(data_dir)
        self.lock = lock
        self.path = self.data_dir / DB_FILE
        self.synchronous = synchronous
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="wsecho-db-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="wsecho-db-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def open(self) -> list[AlarmRow]:
        return await self._on(self._writer, self._open)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn

    def _open(self) -> list[AlarmRow]:
        if self.lock:
            self._lock_fd = lock_data_dir(self.data_dir)
        conn = self._wconn = self._connect()
        self._migrate(conn)
        self._rconn = self._connect()
        rows = conn.execute("SELECT object, namespace, id, name, at_ms FROM alarms").fetchall()
        return [AlarmRow(*row) for row in rows]

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        known = migrations()
        latest = known[-1][0] if known else 0
        if current > latest:
            msg = (
                f"{self.path} has schema version {current}, newer than this wsecho knows ({latest}); "
                "upgrade wsecho or use another --data-dir"
            )
            raise StorageError(msg)
        for version, name, sql in known:
            if version <= current:
                continue
            log.info("migrating %s to schema version %d (%s)", self.path, version, name)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                msg = f"schema migration {name} failed on {self.path}: {exc}"
                raise StorageError(msg) from exc

    async def stored_alarms(self) -> list[AlarmRow]:
        def run() -> list[AlarmRow]:
            assert self._rconn is not None
            rows = self._rconn.execute("SELECT object, namespace, id, name, at_ms FROM alarms").fetchall()
            return [AlarmRow(*row) for row in rows]

        return await self._on(self._reader, run)

    async def read(self, obj: str, keys: list[str]) -> dict[str, bytes]:
        def run() -> dict[str, bytes]:
            assert self._rconn is not None
            marks = ",".join("?" * len(keys))
            rows = self._rconn.execute(
                f"SELECT key, value FROM kv WHERE object = ? AND key IN ({marks})",
                (obj, *keys),
            )
            return dict(rows.fetchall())

        return await self._on(self._reader, run)

    async def scan(
        self,
        obj: str,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]:
        query, args = scan_query("?", obj, start, end, limit, reverse, str)

        def run() -> list[tuple[str, bytes]]:
            assert self._rconn is not None
            return self._rconn.execute(query, args).fetchall()

        return await self._on(self._reader, run)

    async def commit(self, batches: list[Batch]) -> dict[str, int]:
        objects = list(dict.fromkeys(batch.object for batch in batches))

        def usage_of(conn: sqlite3.Connection) -> dict[str, int]:
            found: dict[str, int] = {}
            for i in range(0, len(objects), 500):  # under SQLite's limit of bound parameters
                chunk = objects[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(conn.execute(f"SELECT object, bytes FROM usage WHERE object IN ({marks})", chunk))
            return found

        def run() -> dict[str, int]:
            conn = self._wconn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = usage_of(conn)
                for batch in batches:
                    if batch.clear:
                        conn.execute("DELETE FROM kv WHERE object = ?", (batch.object,))
                    puts = [(batch.object, k, v) for k, v in batch.writes.items() if v is not None]
                    dels = [(batch.object, k) for k, v in batch.writes.items() if v is None]
                    if dels:
                        conn.executemany("DELETE FROM kv WHERE object = ? AND key = ?", dels)
                    if puts:
                        conn.executemany(
                            "INSERT INTO kv (object, key, value) VALUES (?, ?, ?) "
                            "ON CONFLICT (object, key) DO UPDATE SET value = excluded.value",
                            puts,
                        )
                    if isinstance(batch.alarm, AlarmRow):
                        a = batch.alarm
                        conn.execute(
                            "INSERT OR REPLACE INTO alarms (object, namespace, id, name, at_ms) VALUES (?, ?, ?, ?, ?)",
                            (a.object, a.namespace, a.id, a.name, a.at_ms),
                        )
                    elif batch.alarm is None:
                        conn.execute("DELETE FROM alarms WHERE object = ?", (batch.object,))
                after = usage_of(conn)
                conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR); a
                # ROLLBACK then fails and would hide the real error ("database or disk is full").
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            return {obj: after.get(obj, 0) - before.get(obj, 0) for obj in objects}

        try:
            return await self._on(self._writer, run)
        except sqlite3.Error as exc:
            msg = f"writing to {self.path} failed: {exc}"
            raise StorageError(msg) from exc

    async def usage(self, obj: str | None) -> int:
        def run() -> int:
            assert self._rconn is not None
            if obj is None:
                rows = self._rconn.execute("SELECT COALESCE(SUM(bytes), 0) FROM usage")
            else:
                rows = self._rconn.execute("SELECT COALESCE(MAX(bytes), 0) FROM usage WHERE object = ?", (obj,))
            return int(rows.fetchone()[0])

        return await self._on(self._reader, run)

    async def close(self) -> None:
        def run() -> None:
            for conn in (self._rconn, self._wconn):
                if conn is not None:
                    conn.close()
            self._rconn = self._wconn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

        if self._wconn is not None:
            # The reader's connection is closed on the writer thread; no read runs then.
            await self._on(self._reader, lambda: None)
            await self._on(self._writer, run)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)


def _statements(sql: str) -> list[str]:
    """Split a schema file into statements (a trigger's body holds several ';')."""
    statements, current = [], ""
    for line in sql.splitlines():
        if line.strip().startswith("--"):
            continue
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
