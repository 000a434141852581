"""``ctx.storage.sql``: SQL against the object's own SQLite database, as Cloudflare's.

A class declares it with ``storage = "sql"``. Its object then has a database of its own
(see :mod:`wsecho.backends.objectdb`); ``ctx.storage`` keeps its key-value API, stored in
the same database (Cloudflare's ``ctx.storage.kv``), so that a turn's SQL and key-value
writes commit together:

- **One SQLite transaction per turn.** The first statement of a turn opens it; when the
  handler returns, the runtime commits it (one fsync) before it delivers the next event and
  before anything the handler sent leaves (the output gate, as for key-value writes). A crash
  loses a turn's writes whole or not at all, and never one a client was told about.
- ``exec()`` is synchronous, as Cloudflare's: the statement runs at once and its rows are
  read into the cursor (at most as many as ``--max-object-storage`` lets the database hold).
- ``transaction_sync(fn)`` (and ``transaction(fn)``) is a savepoint: if ``fn`` raises, its
  SQL and key-value writes are undone and the rest of the turn is unaffected.
- Statements that would reach outside the database are refused by an authorizer
  (``ATTACH``, ``DETACH``, ``VACUUM INTO``, ``PRAGMA`` other than the ones that read the
  schema, ``BEGIN``/``COMMIT``/``SAVEPOINT``: use ``transaction_sync``), as are tables named
  ``_cf_…`` (the key-value table is ``_cf_KV``).

Limits (Cloudflare's): a statement of at most 100,000 UTF-8 bytes, 100 bound parameters,
2,000,000 bytes per string, blob or row, 100 columns per table; the database as large as
``--max-object-storage`` allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

from wsecho.api import codec
from wsecho.api.storage import (
    MISSING,
    DurableObjectStorage,
    StoragePort,
    Transaction,
    check_key,
    check_keys,
    encode_entries,
    list_range,
)
from wsecho.core.batches import Batch
from wsecho.core.errors import (
    InvalidArgumentError,
    InvalidStateError,
    QuotaExceededError,
    SqlError,
    StorageError,
)

T = TypeVar("T")

MAX_STATEMENT_BYTES = 100_000
MAX_BINDINGS = 100
MAX_VALUE_BYTES = 2_000_000
MAX_COLUMNS = 100
#: The key-value API's table (Cloudflare's name); handlers' statements cannot touch ``_cf_*``.
KV_TABLE = "_cf_KV"
RESERVED_PREFIX = "_cf_"

#: PRAGMAs a statement may run: they read the schema or check it, and change nothing durable.
READ_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_info",
        "index_xinfo",
        "index_list",
        "foreign_key_list",
        "foreign_key_check",
        "integrity_check",
        "quick_check",
        "page_count",
        "page_size",
    }
)
#: Authorizer actions that only read; any other allowed action makes the statement a write.
_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
_REFUSED = {
    sqlite3.SQLITE_ATTACH: "ATTACH (and VACUUM INTO) would reach outside the object's database",
    sqlite3.SQLITE_DETACH: "DETACH: the object has one database",
    sqlite3.SQLITE_TRANSACTION: "BEGIN, COMMIT and ROLLBACK are the runtime's (one transaction per turn); "
    "use ctx.storage.transaction_sync(fn)",
    sqlite3.SQLITE_SAVEPOINT: "SAVEPOINT and RELEASE are the runtime's; use ctx.storage.transaction_sync(fn)",
}


class DatabasePort(StoragePort, Protocol):
    """What SQL storage needs from its object's host besides :class:`StoragePort`."""

    def open_database(self) -> sqlite3.Connection: ...

    def close_database(self, conn: sqlite3.Connection) -> None: ...

    def remove_database(self, conn: sqlite3.Connection) -> None: ...

    async def run_database(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (the commit) off the event loop."""
        ...


def _check_binding(i: int, value: object) -> object:
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        size = len(codec.utf8(value, f"binding {i}"))
    elif isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value)
        size = len(value)
    else:
        msg = f"sql.exec(): binding {i} is a {type(value).__name__}; bind None, int, float, str or bytes"
        raise InvalidArgumentError(msg)
    if size > MAX_VALUE_BYTES:
        msg = f"sql.exec(): binding {i} is {size:,} bytes; the limit is {MAX_VALUE_BYTES:,} per string or blob"
        raise InvalidArgumentError(msg)
    return value


def split_statements(query: str) -> list[str]:
    """The statements of ``query`` (a trigger's body holds several ``;``)."""
    out: list[str] = []
    current = ""
    for piece in query.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\r\n;"):
                out.append(current)
            current = ""
    if current.strip(" \t\r\n;"):
        out.append(current[:-1])  # the last has no ';' of its own
    return out


class SqlCursor:
    """What ``exec()`` returns: its rows (each a dict, or a list with ``raw()``), read once.

    As Cloudflare's, the rows can be consumed once: iterating, ``to_list()``, ``one()`` and
    ``raw()`` take the rows not consumed yet."""

    def __init__(self, columns: list[str], rows: list[tuple[Any, ...]], rows_written: int) -> None:
        self.column_names = columns
        self._rows = rows
        self._next = 0
        #: Rows the statement returned (SQLite does not tell Python how many it scanned).
        self.rows_read = len(rows)
        #: Rows inserted, updated or deleted.
        self.rows_written = rows_written

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._next >= len(self._rows):
            raise StopIteration
        row = self._rows[self._next]
        self._next += 1
        return dict(zip(self.column_names, row, strict=True))

    def to_list(self) -> list[dict[str, Any]]:
        """Every remaining row (Cloudflare's ``toArray()``)."""
        return list(self)

    def one(self) -> dict[str, Any]:
        """The one remaining row; an error if there are none or several."""
        left = len(self._rows) - self._next
        if left != 1:
            msg = f"one(): the statement has {left} rows left; one() wants exactly 1"
            raise InvalidStateError(msg)
        return next(self)

    def raw(self) -> Iterator[list[Any]]:
        """The remaining rows as lists, in column order."""
        while self._next < len(self._rows):
            self._next += 1
            yield list(self._rows[self._next - 1])


class SqlStorage:
    """``ctx.storage.sql`` of one object."""

    def __init__(self, storage: SqlObjectStorage) -> None:
        self._storage = storage

    def exec(self, query: str, *bindings: Any) -> SqlCursor:
        """Run ``query`` (several statements, separated by ``;``, only without bindings) with
        ``bindings`` for its ``?`` parameters; the rows of its last statement."""
        return self._storage.exec_sql(query, bindings)

    @property
    def database_size(self) -> int:
        """The database's size in bytes (its pages)."""
        return self._storage.database_size()


class SqlObjectStorage(DurableObjectStorage):
    """``ctx.storage`` of an object with its own SQLite database (``storage = "sql"``)."""

    def __init__(self, host: DatabasePort) -> None:
        super().__init__(host)
        self._db_host = host
        self._conn: sqlite3.Connection | None = None
        #: Set while the storage runs its own statements (the authorizer lets them through).
        self._internal = False
        #: The statement being prepared writes (the authorizer saw a write action).
        self._writes = False
        self._refusal: str | None = None
        self._savepoints = 0
        #: Why the turn's transaction is gone (SQLite rolled it back on an error), if it is.
        self._lost: str | None = None
        #: take_pending() took the turn's transaction: commit_database() commits it.
        self._commit_wanted = False
        self._commit_clears = False
        #: The commit running on a thread, if one is.
        self._committing: asyncio.Future[None] | None = None
        self._close_wanted = False
        self._commit_lock = threading.Lock()
        #: The event loop's thread: the one thread whose statements the authorizer checks
        #: (the commit threads run nothing but COMMIT and ROLLBACK).
        self._loop_thread = threading.get_ident()
        self._sql = SqlStorage(self)

    # -- the connection -----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = self._db_host.open_database()
            conn.set_authorizer(None)  # an in-memory database keeps the last instance's
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
            conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_STATEMENT_BYTES)
            conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_COLUMNS)
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            quota = self._host.limits.object_storage_bytes
            if quota is not None:
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                conn.execute(f"PRAGMA max_page_count = {max(quota // page_size, 2)}")
            conn.set_authorizer(self._authorize)
            self._conn = conn
        return self._conn

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        if self._internal or threading.get_ident() != self._loop_thread:
            return sqlite3.SQLITE_OK
        refused = _REFUSED.get(action)
        if refused is None and action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name not in READ_PRAGMAS or (arg2 is not None and name == "page_size"):
                allowed = ", ".join(sorted(READ_PRAGMAS))
                refused = f"PRAGMA {name}: only PRAGMAs that read the schema are allowed ({allowed})"
        if refused is None and action not in _READ_ACTIONS and action != sqlite3.SQLITE_PRAGMA:
            self._writes = True
        if refused is not None:
            self._refusal = refused
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _run(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        """One of the storage's own statements."""
        self._internal = True
        try:
            return self._connection().execute(sql, tuple(args))
        finally:
            self._internal = False

    def _begin(self) -> bool:
        """Open the turn's transaction if none is; True if this call opened it."""
        if self._lost is not None:
            msg = f"this turn's SQL transaction was lost ({self._lost}); the object will be reset"
            raise StorageError(msg)
        if self._committing is not None:
            # A write while the last turn's commit runs on its thread (a wait_until task):
            # wait for it, then open the next transaction.
            with self._commit_lock:
                pass
        if self._connection().in_transaction:
            return False
        self._run("BEGIN")
        return True

    def _wrote(self) -> None:
        """A write joined the turn's transaction: the turn's end commits it (the output gate closes)."""
        self._batch()

    def _failed_statement(self, exc: sqlite3.Error, what: str, began: bool) -> BaseException:
        """What to raise for a failed statement (and notice a transaction SQLite rolled back)."""
        conn = self._connection()
        if not conn.in_transaction and not began and (self._pending is not None or self._savepoints):
            self._lost = str(exc)
        elif began and self._pending is None and conn.in_transaction:
            self._run("ROLLBACK")
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            return SqlError(f"{what}: refused: {refusal}")
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            quota = self._host.limits.object_storage_bytes
            msg = (
                f"{what}: this object's database would grow past {quota:,} bytes (--max-object-storage); "
                "nothing of the statement was stored, delete data to make room"
            )
            self._host.quota_refused("object", msg)
            return QuotaExceededError(msg)
        if code == sqlite3.SQLITE_TOOBIG:
            return InvalidArgumentError(f"{what}: a string, blob or row is over {MAX_VALUE_BYTES:,} bytes: {exc}")
        return SqlError(f"{what}: {exc}")

    # -- ctx.storage.sql --------------------------------------------------------------------

    @property
    def sql(self) -> SqlStorage:
        return self._sql

    def exec_sql(self, query: str, bindings: tuple[Any, ...]) -> SqlCursor:
        if not isinstance(query, str):
            msg = f"sql.exec() takes a str query, not {type(query).__name__}"
            raise InvalidArgumentError(msg)
        size = len(codec.utf8(query, "a SQL statement"))
        if size > MAX_STATEMENT_BYTES:
            msg = f"sql.exec(): the statement is {size:,} UTF-8 bytes; the limit is {MAX_STATEMENT_BYTES:,}"
            raise InvalidArgumentError(msg)
        if len(bindings) > MAX_BINDINGS:
            msg = f"sql.exec(): {len(bindings)} bindings; the limit is {MAX_BINDINGS} per statement"
            raise InvalidArgumentError(msg)
        args = tuple(_check_binding(i, v) for i, v in enumerate(bindings, 1))
        if RESERVED_PREFIX in query.lower():
            msg = f"sql.exec(): names that start with {RESERVED_PREFIX!r} are reserved (the key-value API's table)"
            raise SqlError(msg)
        statements = split_statements(query)
        if len(statements) > 1 and args:
            msg = f"sql.exec(): bindings go with one statement; the query has {len(statements)}"
            raise InvalidArgumentError(msg)
        conn = self._connection()
        began = self._begin()
        before = conn.total_changes
        self._writes = False
        cursor = None
        try:
            for statement in statements:
                if cursor is not None:
                    cursor.fetchall()
                cursor = conn.execute(statement, args)
            rows = cursor.fetchall() if cursor is not None else []
        except sqlite3.Error as exc:
            raise self._failed_statement(exc, "sql.exec()", began) from exc
        finally:
            if self._writes:
                self._wrote()
            elif began and self._pending is None and not self._savepoints and conn.in_transaction:
                self._run("COMMIT")  # only read: nothing to make durable, nothing to hold back
        columns = [d[0] for d in cursor.description] if cursor is not None and cursor.description else []
        return SqlCursor(columns, rows, conn.total_changes - before)

    def database_size(self) -> int:
        page_count = self._run("PRAGMA page_count").fetchone()[0]
        page_size = self._run("PRAGMA page_size").fetchone()[0]
        return int(page_count * page_size)

    def transaction_sync(self, fn: Callable[[], T]) -> T:
        """Run ``fn()``; if it raises, none of its SQL or key-value writes stay."""
        name = self._open_savepoint()
        try:
            result = fn()
            if inspect.isawaitable(result):
                msg = "transaction_sync(fn): fn must be synchronous; use transaction(fn) for async"
                raise InvalidArgumentError(msg)
        except BaseException:
            self._end_savepoint(name, keep=False)
            raise
        self._end_savepoint(name, keep=True)
        return result

    async def transaction(self, fn: Callable[[Transaction], Awaitable[T] | T]) -> T:
        """As :meth:`DurableObjectStorage.transaction`, for SQL too: a savepoint."""
        name = self._open_savepoint()
        txn = Transaction(self)
        try:
            result = fn(txn)
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            self._end_savepoint(name, keep=False)
            raise
        finally:
            txn.close()
        self._end_savepoint(name, keep=not txn.rolled_back)
        return result

    def _open_savepoint(self) -> str:
        self._begin()
        name = f"wsecho_{self._savepoints}"
        self._run(f"SAVEPOINT {name}")
        self._savepoints += 1
        self._transactions += 1
        return name

    def _end_savepoint(self, name: str, *, keep: bool) -> None:
        self._savepoints -= 1
        self._transactions -= 1
        if self._lost is None:
            if not keep:
                self._run(f"ROLLBACK TO {name}")
            self._run(f"RELEASE {name}")
        if self._transactions == 0 and self._pending is not None:
            self._commit_outside_a_turn()

    # -- the key-value API, in the same database --------------------------------------------

    def _has_kv(self) -> bool:
        return self._run("SELECT 1 FROM sqlite_master WHERE name = ?", (KV_TABLE,)).fetchone() is not None

    def _kv_write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        began = self._begin()
        try:
            self._internal = True
            try:
                conn = self._connection()
                conn.execute(f"CREATE TABLE IF NOT EXISTS {KV_TABLE} (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID")
                conn.executemany(sql, rows)
            finally:
                self._internal = False
        except sqlite3.Error as exc:
            raise self._failed_statement(exc, "storage", began) from exc
        self._wrote()

    async def get(self, key: str | Iterable[str]) -> Any:
        if isinstance(key, str):
            found = self._kv_read([check_key(key)])
            return codec.decode(found[key]) if key in found else None
        keys = check_keys(key, "get")
        return {k: codec.decode(v) for k, v in self._kv_read(keys).items()}

    def _kv_read(self, keys: list[str]) -> dict[str, bytes]:
        self._connection()
        if not keys or not self._has_kv():
            return {}
        marks = ",".join("?" * len(keys))
        found = dict(self._run(f"SELECT key, value FROM {KV_TABLE} WHERE key IN ({marks})", keys).fetchall())
        return {k: found[k] for k in keys if k in found}

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        lo, hi = list_range(prefix, start, end, limit)
        self._connection()
        if not self._has_kv():
            return {}
        sql = [f"SELECT key, value FROM {KV_TABLE} WHERE 1"]
        args: list[object] = []
        if lo is not None:
            sql.append("AND key >= ?")
            args.append(lo)
        if hi is not None:
            sql.append("AND key < ?")
            args.append(hi)
        sql.append("ORDER BY key DESC" if reverse else "ORDER BY key")
        if limit is not None:
            sql.append("LIMIT ?")
            args.append(limit)
        rows = self._run(" ".join(sql), args).fetchall()
        return {k: codec.decode(v) for k, v in rows if prefix is None or k.startswith(prefix)}

    async def put(self, key: str | Mapping[str, Any], value: Any = MISSING) -> None:
        self._kv_write(
            f"INSERT INTO {KV_TABLE} (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            list(encode_entries(key, value).items()),
        )

    async def delete(self, key: str | Iterable[str]) -> bool | int:
        keys = [check_key(key)] if isinstance(key, str) else check_keys(key, "delete")
        existed = self._kv_read(keys)
        if existed:
            self._kv_write(f"DELETE FROM {KV_TABLE} WHERE key = ?", [(k,) for k in existed])
        return key in existed if isinstance(key, str) else len(existed)

    async def delete_all(self) -> None:
        """Delete every key and every table, index, view and trigger; once committed, the
        object's database file is removed (the alarm stays; use delete_alarm())."""
        began = self._begin()
        try:
            self._internal = True
            try:
                conn = self._connection()
                conn.execute("PRAGMA defer_foreign_keys = ON")  # the tables go in any order
                rows = conn.execute(
                    "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY rowid DESC"
                ).fetchall()
                for kind, name in rows:
                    quoted = '"' + name.replace('"', '""') + '"'
                    conn.execute(f"DROP {kind.upper()} IF EXISTS {quoted}")
            finally:
                self._internal = False
        except sqlite3.Error as exc:
            raise self._failed_statement(exc, "delete_all()", began) from exc
        self._batch().clear = True

    # -- for the runtime ------------------------------------------------------------------

    def take_pending(self) -> Batch | None:
        """Take the turn's transaction for :meth:`commit_database`; what is left for the shared
        backend is the alarm, if the turn set or deleted it."""
        batch, self._pending = self._pending, None
        if batch is None:
            return None
        if self._lost is not None:
            lost, self._lost = self._lost, None
            msg = f"SQLite rolled back this turn's transaction ({lost})"
            raise StorageError(msg)
        self._commit_wanted = True
        self._commit_clears = self._commit_clears or batch.clear
        if batch.alarm is ...:
            return None
        rest = Batch(batch.object, alarm=batch.alarm)
        self._in_flight.append(rest)
        return rest

    async def commit_database(self) -> None:
        """Commit what :meth:`take_pending` took, on a commit thread (one fsync of this
        object's file); return once it is durable."""
        while self._commit_wanted or self._committing is not None:
            if self._committing is not None:
                await asyncio.shield(self._committing)
                continue
            conn = self._conn
            self._commit_wanted = False
            if conn is None or not conn.in_transaction:
                continue
            clears, self._commit_clears = self._commit_clears, False
            self._commit_lock.acquire()  # the commit thread releases it once COMMIT is done
            try:
                self._committing = asyncio.ensure_future(
                    self._db_host.run_database(functools.partial(self._commit_on_thread, conn))
                )
            except BaseException:
                self._commit_lock.release()
                raise
            try:
                await asyncio.shield(self._committing)
            finally:
                self._committing = None
                if self._close_wanted:
                    self.close()
            empty = clears and self._conn is conn and not conn.in_transaction
            if empty and self._run("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                # delete_all() and nothing written since: the object stores nothing.
                self._conn = None
                self._db_host.remove_database(conn)

    def _commit_on_thread(self, conn: sqlite3.Connection) -> None:
        """COMMIT on a commit thread (whose statements the authorizer lets through; in memory,
        on the event loop's, as the storage's own), then let the loop's statements in again."""
        inline = threading.get_ident() == self._loop_thread
        self._internal = self._internal or inline
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            msg = f"committing the object's database failed: {exc}"
            raise StorageError(msg) from exc
        finally:
            if inline:
                self._internal = False
            self._commit_lock.release()

    def busy(self) -> bool:
        return super().busy() or self._commit_wanted or self._committing is not None

    def discard_pending(self) -> None:
        """The object is reset: its uncommitted turn is lost (a commit already running on its
        thread finishes; the outputs that waited for it are discarded by the runtime)."""
        super().discard_pending()
        self._lost = None
        self._commit_wanted = self._commit_clears = False
        conn = self._conn
        if conn is not None and self._committing is None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._run("ROLLBACK")

    def close(self) -> None:
        if self._committing is not None:
            self._close_wanted = True  # closed when the commit's thread is done with it
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            self._db_host.close_database(conn)
