"""Storage in PostgreSQL (``--storage postgresql://...``): the :class:`~wsecho.backends.base.Backend`
interface on psycopg 3, asynchronous, over a bounded connection pool.

It behaves as :class:`~wsecho.backends.base.SQLiteBackend` does: the same key order (keys are
stored as their UTF-8 bytes in ``bytea``, which compares bytewise as SQLite compares TEXT), one
transaction per ``commit`` whatever the number of batches and objects, usage kept exact by a
trigger in that transaction, and versioned schema files (``schema/postgres/NNN_*.sql``) applied
under an advisory lock, so that processes that start together do not race.

Reads and the writer share the pool: a commit holds one connection for its transaction, reads
take the others. Durability is PostgreSQL's: a commit returns once the server has flushed its
WAL (``synchronous_commit`` is set ``on`` for wsecho's sessions, whatever the server's default).

Fencing (the lead's slot leases): ``fence(conn, batches)`` runs first inside every commit's
transaction; when it raises, the transaction rolls back and nothing of the commit is stored.
Every row carries its object's slot (:func:`wsecho.core.placement.slot_of`) for that check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from wsecho.backends.base import migrations, scan_query
from wsecho.backends.dsn import redact
from wsecho.backends.leases import FENCED_SQLSTATE, FencedError
from wsecho.core.alarms import AlarmRow
from wsecho.core.batches import Batch
from wsecho.core.errors import StorageError
from wsecho.core.placement import slot_of

log = logging.getLogger(__name__)

#: Connections per process (per worker with ``--workers N``): one for the writer, the rest for reads.
POOL_SIZE = 4
#: How long an operation waits for a connection (and so for the server to come back) before it fails.
POOL_TIMEOUT = 5.0
#: The pool retries a lost connection with back-off (1, 2, 4, 8 s) for this long, then starts
#: over at the next operation (the storage probe's): so a server that comes back is noticed
#: within about 10 s, however long it was away.
RECONNECT_TIMEOUT = 15.0
#: How long making one connection may take (libpq's connect_timeout).
CONNECT_TIMEOUT = 5
#: The advisory lock that serialises schema migrations (b"wsecho" as a number).
MIGRATION_LOCK = 0x777365636F68

#: How wsecho's connections are made. TCP keepalives: a server that vanished without a FIN (a
#: host down, a partition) fails the operation in about 20 s instead of the kernel's two hours.
CONNECTION: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}

T = TypeVar("T")

#: How long the server lets a transaction wait on a process that stopped in the middle of it.
IDLE_IN_TRANSACTION = 30.0

#: Builds the fencing statement for a commit (see PostgresBackend.fence_sql).
FenceSQL = Callable[[list[Batch]], tuple[str, Sequence[Any]]]

#: Runs first in every commit's transaction, on its connection; raising aborts the commit.
Fence = Callable[[psycopg.AsyncConnection[Any], list[Batch]], Awaitable[None]]

_HEX_ID = re.compile(r"[0-9a-f]{64}")


async def detached(coro: Awaitable[T]) -> T:
    """Run ``coro`` (a handler's read) in a task of its own, awaited through a shield.

    A task of its own: see :func:`in_task`. The shield: a turn cancelled while it waits (its
    object reset, its slot's lease lost) must end at once, but psycopg answers a cancellation
    by asking the server to cancel the query, which takes seconds when the server cannot be
    reached; meanwhile the old instance's handler would still be running. The read finishes
    in the background and gives its connection back to the pool."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a read nobody waits for any more: its error is not worth a log line


async def in_task(coro: Awaitable[T]) -> T:
    """Run ``coro`` in a task of its own. A handler's first step runs outside any task
    (``DurableObject.eager_handlers``), and on Python 3.12+ the pool's waits (``asyncio.timeout``)
    need one: without it a read that waits for a free connection raises RuntimeError."""
    return await asyncio.ensure_future(coro)


def _alarm_rows(rows: list[Any]) -> list[AlarmRow]:
    return [
        AlarmRow(obj, ns, hex_id, None if name is None else bytes(name).decode("utf-8"), at_ms)
        for obj, ns, hex_id, name, at_ms in rows
    ]


def object_slot(obj: str) -> int | None:
    """The slot of the object stored as ``obj`` ("namespace:hex"), None for rows of no object."""
    hex_id = obj.rpartition(":")[2]
    return slot_of(hex_id) if _HEX_ID.fullmatch(hex_id) else None


class PostgresBackend:
    """Objects' storage in the PostgreSQL database at ``url``."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, fence: Fence | None = None) -> None:
        self.url = url
        #: The URL without its password: what logs and errors name.
        self.where = redact(url)
        self.pool_size = pool_size
        self.fence = fence
        #: A statement (and its parameters) that the one-message commit runs first, in its
        #: transaction: a cluster member's fencing check (wsecho.backends.leases.fence_sql).
        #: It may raise to refuse the commit before anything is sent.
        self.fence_sql: FenceSQL | None = None
        #: Seconds a transaction may wait on this process before the server ends it (a cluster
        #: member sets its lease ttl: a take-over then waits at most that long for the locks).
        self.idle_in_transaction = IDLE_IN_TRANSACTION
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        #: Operations holding a connection; close() lets them finish (as SQLite's threads do).
        self._in_use = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- opening ------------------------------------------------------------------------------

    async def open(self) -> list[AlarmRow]:
        """Connect once (a database that cannot be reached fails here, at start-up, with libpq's
        reason), bring the schema up to date, read the alarms; then open the pool."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **CONNECTION)
        except psycopg.Error as exc:
            msg = f"cannot connect to the PostgreSQL database {self.where}: {_reason(exc)}"
            raise StorageError(msg) from exc
        try:
            async with conn:
                await self.migrate(conn)
                cur = await conn.execute("SELECT object, namespace, id, name, at_ms FROM alarms")
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            msg = f"reading the alarms from the PostgreSQL database {self.where} failed: {_reason(exc)}"
            raise StorageError(msg) from exc
        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            kwargs=CONNECTION,
            configure=self._configure,
            timeout=POOL_TIMEOUT,
            reconnect_timeout=RECONNECT_TIMEOUT,
            name="wsecho",
        )
        await self._pool.open(wait=False)
        return _alarm_rows(rows)

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # An acknowledged write must be on the server's disk: never let a server default of
        # synchronous_commit = off (or local, with a replica) weaken that.
        await conn.execute("SET synchronous_commit = on")
        # A process that stops in the middle of a commit (SIGSTOP, a partition) must not hold
        # its row locks for ever: the server ends its transaction (nothing of it is acknowledged).
        ms = max(int(self.idle_in_transaction * 1000), 1)
        await conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")

    async def stored_alarms(self) -> list[AlarmRow]:
        if asyncio.current_task() is None:  # an eager handler's first step: see in_task()
            return await in_task(self.stored_alarms())
        async with self._connection("reading the alarms from") as conn:
            cur = await conn.execute("SELECT object, namespace, id, name, at_ms FROM alarms")
            return _alarm_rows(await cur.fetchall())

    async def migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Bring the schema up to date: every pending file in one transaction, under an advisory
        lock (a second process waits, then finds the work done)."""
        known = migrations("postgres")
        latest = known[-1][0] if known else 0
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS wsecho_schema ("
                " one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)"
            )
            cur = await conn.execute("SELECT version FROM wsecho_schema")
            row = await cur.fetchone()
            current = 0 if row is None else int(row[0])
            if current > latest:
                msg = (
                    f"the PostgreSQL database {self.where} has wsecho schema version {current}, newer than "
                    f"this wsecho knows ({latest}); upgrade wsecho or use another database"
                )
                raise StorageError(msg)
            for version, name, sql in known:
                if version <= current:
                    continue
                log.info("migrating %s to schema version %d (%s)", self.where, version, name)
                try:
                    await conn.execute(sql.encode("utf-8"))  # several statements: no parameters
                except psycopg.Error as exc:
                    msg = f"schema migration {name} failed on {self.where}: {_reason(exc)}"
                    raise StorageError(msg) from exc
                await conn.execute(
                    "INSERT INTO wsecho_schema (one, version) VALUES (true, %s)"
                    " ON CONFLICT (one) DO UPDATE SET version = excluded.version",
                    (version,),
                )

    @contextlib.asynccontextmanager
    async def _connection(self, doing: str) -> Any:
        """A connection of the pool; a driver error becomes a StorageError naming ``doing`` and the database."""
        pool = self._pool
        if pool is None:
            msg = f"the PostgreSQL storage {self.where} is not open"
            raise StorageError(msg)
        self._in_use += 1
        self._idle.clear()
        try:
            async with pool.connection() as conn:
                yield conn
        except (psycopg.Error, OSError) as exc:
            if isinstance(exc, psycopg.Error) and exc.sqlstate == FENCED_SQLSTATE:
                raise FencedError(f"refused to commit: {_reason(exc)} (fenced)") from exc
            if isinstance(exc, psycopg.OperationalError):
                # The server may have gone away: drop the idle connections that went with it, so
                # that the next operation (the storage probe's) connects afresh.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.check(), CONNECT_TIMEOUT)
            msg = f"{doing} the PostgreSQL database {self.where} failed: {_reason(exc)}"
            raise StorageError(msg) from exc
        finally:
            self._in_use -= 1
            if not self._in_use:
                self._idle.set()

    # -- reads ---------------------------------------------------------------------------------

    async def read(self, obj: str, keys: list[str]) -> dict[str, bytes]:
        return await detached(self._read(obj, keys))

    async def _read(self, obj: str, keys: list[str]) -> dict[str, bytes]:
        async with self._connection("reading from") as conn:
            cur = await conn.execute(
                "SELECT key, value FROM kv WHERE object = %s AND key = ANY(%s)",
                (obj, [k.encode("utf-8") for k in keys]),
            )
            return {bytes(k).decode("utf-8"): bytes(v) for k, v in await cur.fetchall()}

    async def scan(
        self,
        obj: str,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]:
        return await detached(self._scan(obj, start, end, limit, reverse))

    async def _scan(
        self, obj: str, start: str | None, end: str | None, limit: int | None, reverse: bool
    ) -> list[tuple[str, bytes]]:
        query, args = scan_query("%s", obj, start, end, limit, reverse, _utf8)
        async with self._connection("reading from") as conn:
            cur = await conn.execute(query.encode(), args)
            return [(bytes(k).decode("utf-8"), bytes(v)) for k, v in await cur.fetchall()]

    async def usage(self, obj: str | None) -> int:
        if asyncio.current_task() is None:  # an eager handler's first step: see in_task()
            return await in_task(self.usage(obj))
        async with self._connection("reading the usage from") as conn:
            if obj is None:
                cur = await conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM usage")
            else:
                cur = await conn.execute("SELECT COALESCE(MAX(bytes), 0) FROM usage WHERE object = %s", (obj,))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    # -- the commit ----------------------------------------------------------------------------

    async def commit(self, batches: list[Batch]) -> dict[str, int]:
        if self.fence is None:
            return await self._commit_at_once(batches)
        objects = list(dict.fromkeys(batch.object for batch in batches))
        # Pipeline mode: the statements of every batch go out without waiting for each answer,
        # so a commit of many objects costs a few round trips, not one per statement.
        async with self._connection("writing to") as conn, conn.pipeline(), conn.transaction():
            if self.fence is not None:
                await self.fence(conn, batches)  # first: a refused commit writes nothing
            before = await _usage_of(conn, objects)
            await self.apply(conn, batches)
            after = await _usage_of(conn, objects)
        return {obj: after.get(obj, 0) - before.get(obj, 0) for obj in objects}

    async def _commit_at_once(self, batches: list[Batch]) -> dict[str, int]:
        """The whole transaction in one message (the statements bound on this side): the server
        runs it without waiting on this process half-way, so a process that stops (SIGSTOP, a
        partition) in the middle of a commit never holds a lock — a fencing check's included —
        while the others wait. One round trip, too."""
        objects = list(dict.fromkeys(batch.object for batch in batches))
        statements: list[str] = ["BEGIN"]
        params: list[Any] = []
        if self.fence_sql is not None:
            sql, args = self.fence_sql(batches)  # may raise: refused before anything is sent
            statements.append(sql)
            params.extend(args)
        usage = "SELECT object, bytes FROM usage WHERE object = ANY(%s)"
        statements.append(usage)
        params.append(objects)
        for batch in batches:
            obj, slot = batch.object, object_slot(batch.object)
            if batch.clear:
                statements.append("DELETE FROM kv WHERE object = %s")
                params.append(obj)
            dels = [k.encode("utf-8") for k, v in batch.writes.items() if v is None]
            puts = [(k.encode("utf-8"), v) for k, v in batch.writes.items() if v is not None]
            if dels:
                statements.append("DELETE FROM kv WHERE object = %s AND key = ANY(%s)")
                params.extend((obj, dels))
            if puts:
                rows = ", ".join(["(%s, %s, %s, %s)"] * len(puts))
                statements.append(
                    f"INSERT INTO kv (object, key, value, slot) VALUES {rows}"
                    " ON CONFLICT (object, key) DO UPDATE SET value = excluded.value"
                )
                for key, value in puts:
                    params.extend((obj, key, value, slot))
            if isinstance(batch.alarm, AlarmRow):
                a = batch.alarm
                statements.append(
                    "INSERT INTO alarms (object, namespace, id, name, at_ms, slot) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (object) DO UPDATE SET namespace = excluded.namespace, id = excluded.id,"
                    " name = excluded.name, at_ms = excluded.at_ms, slot = excluded.slot"
                )
                params.extend((a.object, a.namespace, a.id, None if a.name is None else a.name.encode("utf-8")))
                params.extend((a.at_ms, slot))
            elif batch.alarm is None:
                statements.append("DELETE FROM alarms WHERE object = %s")
                params.append(obj)
        statements.append(usage)
        params.append(objects)
        statements.append("COMMIT")
        async with self._connection("writing to") as conn:
            cur = psycopg.AsyncClientCursor(conn)
            try:
                await cur.execute(";\n".join(statements), params)
            except BaseException:
                # The server stopped at the failing statement, inside the transaction.
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
                raise
            usages: list[dict[str, int]] = []
            while True:
                if cur.description is not None and [c.name for c in cur.description] == ["object", "bytes"]:
                    usages.append({o: int(n) for o, n in await cur.fetchall()})
                if not cur.nextset():
                    break
        before, after = usages[0], usages[-1]
        return {obj: after.get(obj, 0) - before.get(obj, 0) for obj in objects}

    async def apply(self, conn: psycopg.AsyncConnection[Any], batches: list[Batch]) -> None:
        """Write ``batches`` in the open transaction of ``conn``, in order (a later batch of an
        object sees the earlier ones)."""
        async with conn.cursor() as cur:
            for batch in batches:
                obj, slot = batch.object, object_slot(batch.object)
                if batch.clear:
                    await cur.execute("DELETE FROM kv WHERE object = %s", (obj,))
                dels = [(obj, k.encode("utf-8")) for k, v in batch.writes.items() if v is None]
                puts = [(obj, k.encode("utf-8"), v, slot) for k, v in batch.writes.items() if v is not None]
                if dels:
                    await cur.executemany("DELETE FROM kv WHERE object = %s AND key = %s", dels)
                if puts:
                    await cur.executemany(
                        "INSERT INTO kv (object, key, value, slot) VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (object, key) DO UPDATE SET value = excluded.value",
                        puts,
                    )
                if isinstance(batch.alarm, AlarmRow):
                    a = batch.alarm
                    name = None if a.name is None else a.name.encode("utf-8")
                    await cur.execute(
                        "INSERT INTO alarms (object, namespace, id, name, at_ms, slot) VALUES (%s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (object) DO UPDATE SET namespace = excluded.namespace, id = excluded.id,"
                        " name = excluded.name, at_ms = excluded.at_ms, slot = excluded.slot",
                        (a.object, a.namespace, a.id, name, a.at_ms, slot),
                    )
                elif batch.alarm is None:
                    await cur.execute("DELETE FROM alarms WHERE object = %s", (obj,))

    async def close(self) -> None:
        """Let the operations under way finish (each is bounded by the pool's and the
        connection's timeouts), then close every connection."""
        pool = self._pool
        if pool is None:
            return
        await self._idle.wait()
        self._pool = None
        await pool.close()


async def _usage_of(conn: psycopg.AsyncConnection[Any], objects: list[str]) -> dict[str, int]:
    cur = await conn.execute("SELECT object, bytes FROM usage WHERE object = ANY(%s)", (objects,))
    return {obj: int(n) for obj, n in await cur.fetchall()}


def _utf8(key: str) -> bytes:
    return key.encode("utf-8")


def _reason(exc: BaseException) -> str:
    """The first line of a driver error (libpq's messages go on with context lines)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
