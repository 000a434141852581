"""Members and slot leases in PostgreSQL (docs/decisions/0007).

Two tables: ``wsecho_members`` (a heartbeat per serving process, in the database's clock) and
``wsecho_slots`` (one row per slot: owner, epoch, expiry). Every statement here is one
autocommitted statement, so a member that is cut off mid-way leaves nothing half done; the
fencing check (:func:`fence`) runs inside the storage commit's own transaction.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from wsecho.core.errors import StorageError
from wsecho.core.placement import SLOTS

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

#: Serialises the creation of the tables by members that start together.
SCHEMA_LOCK = 0x77736563686F  # "wsecho"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS wsecho_members (
        member text PRIMARY KEY,
        name text NOT NULL,
        draining boolean NOT NULL DEFAULT false,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS wsecho_slots (
        slot integer PRIMARY KEY,
        owner text,
        epoch bigint NOT NULL DEFAULT 0,
        expires_at timestamptz NOT NULL DEFAULT '-infinity'
    )""",
    f"INSERT INTO wsecho_slots (slot) SELECT generate_series(0, {SLOTS - 1}) ON CONFLICT DO NOTHING",
    # Where the other members reach this one's peer channel (docs/decisions/0012); added to the
    # table of a cluster that ran an older version, whose members then advertise no address.
    "ALTER TABLE wsecho_members ADD COLUMN IF NOT EXISTS address text",
    # The fencing check, run by the server inside a commit's one message (no round trip to the
    # member while the rows are locked): every slot held by the member at that epoch, else an
    # error with FENCED_SQLSTATE. The rows stay key-share-locked until the commit ends.
    """CREATE OR REPLACE FUNCTION wsecho_fence(m text, s integer[], e bigint[]) RETURNS integer
    LANGUAGE plpgsql AS $$
    DECLARE held integer;
    BEGIN
        SELECT count(*) INTO held FROM (
            SELECT 1 FROM wsecho_slots w JOIN unnest(s, e) AS f(slot, epoch)
                ON w.slot = f.slot AND w.epoch = f.epoch
            WHERE w.owner = m FOR KEY SHARE OF w) AS locked;
        IF held <> cardinality(s) THEN
            RAISE EXCEPTION 'this process no longer holds the lease of one of the slots %', s
                USING ERRCODE = 'WSF01';
        END IF;
        RETURN held;
    END $$""",
)

#: How many ttls a member's heartbeat counts for.
MEMBER_GRACE = 1.5

#: The SQLSTATE of a commit the fencing check refused.
FENCED_SQLSTATE = "WSF01"


@attrs.frozen
class SlotOwner:
    """The member that holds a slot's lease, as the lease table says: its id for this life,
    its name, its peer channel's ``host:port`` (None: it advertises none) and the epoch."""

    slot: int
    member: str
    name: str
    address: str | None
    epoch: int


class FencedError(StorageError):
    """A commit for slots whose lease this member no longer holds at the epoch it acted under."""


class PostgresLeases:
    """The lease statements over one connection of the member's own (not the storage pool's:
    a renewal must not wait behind storage work)."""

    #: The longest one statement may take (a member's round must end within a third of the ttl).
    statement_timeout = 2.0

    def __init__(self, conninfo: str, member: str, name: str | None = None, address: str | None = None) -> None:
        """``member``: unique to this process's life (the lease owner); ``name``: what the
        slots are spread by and what the load balancer calls it, stable across restarts
        (default: ``member``); ``address``: ``host:port`` of its peer channel (None: none)."""
        self.conninfo = conninfo
        self.member = member
        self.name = member if name is None else name
        self.address = address
        self._conn: psycopg.AsyncConnection[Any] | None = None
        #: A second connection for :meth:`locate`: look-ups for calls between members must not
        #: queue in front of a renewal.
        self._lookups: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                await conn.close()
            self._conn = conn = await self._connect()
        return conn

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        ms = max(int(self.statement_timeout * 1000), 1)
        # A statement that waits on a lock or a slow server gives up, and the member's
        # proof runs out on its own clock; the server drops a connection that went silent.
        # (Added to the URL's own options, such as a search_path.)
        given = conninfo_to_dict(self.conninfo).get("options") or ""
        timeouts = f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={ms * 5}"
        return await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,
            connect_timeout=max(int(self.statement_timeout), 1),
            options=f"{given} {timeouts}".strip(),
            keepalives=1,
            keepalives_idle=max(int(self.statement_timeout), 1),
            keepalives_interval=1,
            keepalives_count=3,
        )

    def forget_connection(self) -> None:
        """Drop the connection without a round trip (after a timeout: the server may be unreachable)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    async def create_schema(self) -> None:
        conn = await self._connection()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA:
                await conn.execute(statement)

    async def heartbeat(self, ttl: float, draining: bool) -> list[str]:
        """Record that this member is alive (or draining); return the names of the live, serving members."""
        conn = await self._connection()
        await conn.execute(
            "INSERT INTO wsecho_members (member, name, draining, address, heartbeat_at) VALUES (%s, %s, %s, %s, now()) "
            "ON CONFLICT (member) DO UPDATE SET draining = excluded.draining, address = excluded.address, "
            "heartbeat_at = now()",
            (self.member, self.name, draining, self.address),
        )
        # A member is alive while its heartbeat is younger than 1.5 ttl: one late round (a
        # busy machine) must not move its slots away and back.
        cur = await conn.execute(
            "SELECT DISTINCT name FROM wsecho_members "
            "WHERE NOT draining AND heartbeat_at > now() - make_interval(secs => %s) ORDER BY name",
            (ttl * MEMBER_GRACE,),
        )
        return [row[0] for row in await cur.fetchall()]

    async def acquire(self, slots: Sequence[int], ttl: float) -> dict[int, int]:
        """Renew those of ``slots`` this member holds, then take those free or expired; the
        epoch goes up when the owner changes. Returns slot -> epoch for every slot held now.

        A slot whose row another member's commit holds (its fencing check) is skipped, not
        waited for: one stuck commit elsewhere must not stop this member renewing the rest.
        """
        if not slots:
            return {}
        conn = await self._connection()
        params = {"m": self.member, "ttl": ttl, "slots": list(slots)}
        cur = await conn.execute(
            "UPDATE wsecho_slots SET expires_at = now() + make_interval(secs => %(ttl)s) "
            "WHERE owner = %(m)s AND slot = ANY(%(slots)s) RETURNING slot, epoch",
            params,
        )
        held = {int(slot): int(epoch) for slot, epoch in await cur.fetchall()}
        wanted = [s for s in slots if s not in held]
        if wanted:
            cur = await conn.execute(
                "UPDATE wsecho_slots SET epoch = epoch + 1, owner = %(m)s, "
                "expires_at = now() + make_interval(secs => %(ttl)s) "
                "WHERE slot IN (SELECT slot FROM wsecho_slots WHERE slot = ANY(%(slots)s) "
                "AND owner IS DISTINCT FROM %(m)s AND (owner IS NULL OR expires_at < now()) "
                "FOR UPDATE SKIP LOCKED) RETURNING slot, epoch",
                {**params, "slots": wanted},
            )
            held.update({int(slot): int(epoch) for slot, epoch in await cur.fetchall()})
        return held

    async def release(self, slots: Sequence[int]) -> None:
        """Let others take ``slots`` at once (this member has stopped serving them)."""
        if not slots:
            return
        conn = await self._connection()
        await conn.execute(
            "UPDATE wsecho_slots SET expires_at = now() - interval '1 millisecond' WHERE owner = %s AND slot = ANY(%s)",
            (self.member, list(slots)),
        )

    async def leave(self) -> None:
        """Release every slot and remove this member (a clean stop)."""
        conn = await self._connection()
        await conn.execute(
            "UPDATE wsecho_slots SET expires_at = now() - interval '1 millisecond' WHERE owner = %s",
            (self.member,),
        )
        await conn.execute("DELETE FROM wsecho_members WHERE member = %s", (self.member,))

    async def owners(self) -> dict[int, tuple[str | None, int, bool]]:
        """Every slot's owner, epoch and whether its lease is live (for /objects and tests)."""
        conn = await self._connection()
        cur = await conn.execute("SELECT slot, owner, epoch, expires_at > now() FROM wsecho_slots")
        return {int(s): (o, int(e), bool(live)) for s, o, e, live in await cur.fetchall()}

    async def locate(self, slot: int) -> SlotOwner | None:
        """Who holds ``slot``'s lease now and where its peer channel is; None while no live
        lease is held (between an owner's death and its successor's take-over)."""
        conn = self._lookups
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                await conn.close()
            self._lookups = conn = await self._connect()
        cur = await conn.execute(
            "SELECT s.owner, m.name, m.address, s.epoch FROM wsecho_slots s "
            "JOIN wsecho_members m ON m.member = s.owner WHERE s.slot = %s AND s.expires_at > now()",
            (slot,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        member, name, address, epoch = row
        return SlotOwner(slot, str(member), str(name), None if address is None else str(address), int(epoch))

    async def close(self) -> None:
        for conn in (self._conn, self._lookups):
            if conn is not None:
                await conn.close()
        self._conn = self._lookups = None


def fence_sql(member: str, epochs: Mapping[int, int]) -> tuple[str, list[Any]]:
    """The fencing check as one statement (for a commit sent as one message)."""
    slots = sorted(epochs)
    return "SELECT wsecho_fence(%s, %s::integer[], %s::bigint[])", [member, slots, [epochs[s] for s in slots]]


async def fence(conn: psycopg.AsyncConnection[Any], member: str, epochs: Mapping[int, int]) -> None:
    """In the caller's transaction: raise :class:`FencedError` unless ``member`` still holds every
    slot of ``epochs`` at that epoch. The rows stay key-share-locked until the transaction
    ends, so no other member can take one of these slots between this check and the commit
    (a take-over locks the row FOR UPDATE), while this member's own renewals (a plain UPDATE,
    which does not conflict with a key-share lock) go on."""
    if not epochs:
        return
    slots = sorted(epochs)
    cur = await conn.execute(
        "SELECT s.slot FROM wsecho_slots s "
        "JOIN unnest(%s::integer[], %s::bigint[]) AS f(slot, epoch) ON s.slot = f.slot AND s.epoch = f.epoch "
        "WHERE s.owner = %s FOR KEY SHARE OF s",
        (slots, [epochs[s] for s in slots], member),
    )
    held = {int(row[0]) for row in await cur.fetchall()}
    lost = [s for s in slots if s not in held]
    if lost:
        shown = ", ".join(map(str, lost[:10])) + (" …" if len(lost) > 10 else "")
        msg = f"refused to commit: this process no longer holds the lease of slot {shown} (fenced)"
        raise FencedError(msg)
