"""``ctx.storage``: an object's durable key-value store and alarm, with Cloudflare's output gate.

What a handler can rely on:

- **Reads see every earlier write** of the object at once, committed or not.
- **A turn's writes are atomic.** ``put``/``delete``/``delete_all``/``set_alarm`` go into
  the turn's write batch and return at once; when the handler returns (or raises),
  the batch is committed in one transaction before the next event is delivered.
  A crash loses a whole batch or nothing of it, never half.
- **Output gate.** From the first write of a turn until its batch is durable, the
  messages and closes the object sends and the response it returns are held
  back. So a client is never told about a write that a crash could still lose.
- ``transaction(fn)`` makes a part of a turn all-or-nothing: if ``fn`` raises (or calls
  ``txn.rollback()``), its writes are undone and the rest of the turn is unaffected.
- Values are copies: what ``get`` returns can be changed freely.

Limits: keys are ``str`` of at most 2,048 UTF-8 bytes; values at most 131,072 bytes
encoded (see :mod:`wsecho.api.codec`); ``get``/``put``/``delete`` of many take at most 128 keys.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from wsecho.api import codec
from wsecho.api.ids import DurableObjectId
from wsecho.core.alarms import AlarmRow
from wsecho.core.batches import Batch, entry_bytes
from wsecho.core.errors import InvalidArgumentError, InvalidStateError, QuotaExceededError

if TYPE_CHECKING:
    from wsecho.core.limits import Limits

T = TypeVar("T")

MAX_KEY_BYTES = 2048
MAX_VALUE_BYTES = 128 * 1024
MAX_KEYS_PER_CALL = 128
#: Committed values an awake object keeps in memory (it forgets them when it hibernates).
CACHE_ENTRIES = 10_000

#: put()'s default value: none was given.
MISSING: Any = object()


def object_key(id: DurableObjectId) -> str:  # noqa: A002
    """How storage names an object: ``namespace:hex``."""
    return f"{id.namespace}:{id.hex}"


class StoragePort(Protocol):
    """What ``ctx.storage`` needs from its object's host (the runtime implements it)."""

    id: DurableObjectId
    limits: Limits

    def batch_started(self) -> None:
        """A write opened a new batch: hold the object's outputs and keep it in memory."""
        ...

    def in_own_turn(self) -> bool:
        """Whether the object's own handler is running here (its turn's end commits)."""
        ...

    def flush_soon(self, storage: DurableObjectStorage) -> None:
        """Commit what is pending soon (writes outside a turn: a wait_until task)."""
        ...

    async def flush(self, storage: DurableObjectStorage) -> None:
        """Commit what is pending and wait until every write so far is durable."""
        ...

    async def read(self, obj: str, keys: list[str]) -> dict[str, bytes]: ...

    async def scan(
        self, obj: str, start: str | None, end: str | None, limit: int | None, reverse: bool
    ) -> list[tuple[str, bytes]]: ...

    async def usage(self, obj: str) -> int: ...

    def stored_bytes(self) -> int:
        """Bytes all objects store, as committed."""
        ...

    def alarm_at(self, obj: str) -> int | None:
        """When ``obj``'s committed alarm is due (epoch ms), or None."""
        ...

    def quota_refused(self, which: str, message: str) -> None: ...


def check_key(key: object) -> str:
    if not isinstance(key, str):
        msg = f"storage keys must be str, got {type(key).__name__}"
        raise InvalidArgumentError(msg)
    size = len(codec.utf8(key, "a storage key"))
    if size > MAX_KEY_BYTES:
        msg = f"storage key {key[:40]!r}… is {size} UTF-8 bytes; the limit is {MAX_KEY_BYTES}"
        raise InvalidArgumentError(msg)
    return key


def check_keys(keys: Iterable[object], what: str) -> list[str]:
    out = [check_key(k) for k in keys]
    if len(out) > MAX_KEYS_PER_CALL:
        msg = f"{what}() of {len(out)} keys; the limit is {MAX_KEYS_PER_CALL} per call"
        raise InvalidArgumentError(msg)
    return out


def encode_value(key: str, value: Any) -> bytes:
    if value is None:
        msg = f"put({key!r}, None): None cannot be stored; use delete({key!r})"
        raise InvalidArgumentError(msg)
    data = codec.encode(value)
    if len(data) > MAX_VALUE_BYTES:
        msg = f"the value for {key!r} is {len(data)} bytes encoded; the limit is {MAX_VALUE_BYTES}"
        raise InvalidArgumentError(msg)
    return data


def encode_entries(key: str | Mapping[str, Any], value: Any) -> dict[str, bytes]:
    """What ``put(key, value)`` or ``put(entries)`` stores: key -> encoded value (checked)."""
    if isinstance(key, str):
        if value is MISSING:
            msg = "put(key, value) needs a value; put(entries) takes a dict"
            raise InvalidArgumentError(msg)
        return {check_key(key): encode_value(key, value)}
    if isinstance(key, Mapping):
        if value is not MISSING:
            msg = "put(entries) takes a dict and no value"
            raise InvalidArgumentError(msg)
        check_keys(key.keys(), "put")
        return {k: encode_value(k, v) for k, v in key.items()}
    msg = f"put() takes a str key and a value, or a dict, not {type(key).__name__}"
    raise InvalidArgumentError(msg)


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


def list_range(
    prefix: str | None, start: str | None, end: str | None, limit: int | None
) -> tuple[str | None, str | None]:
    """The keys ``[lo, hi)`` a ``list()`` with these options covers (after checking them)."""
    for bound in (prefix, start, end):
        if bound is not None:
            check_key(bound)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        msg = f"list(): limit must be a positive integer, got {limit!r}"
        raise InvalidArgumentError(msg)
    lo, hi = start, end
    if prefix is not None:
        lo = prefix if lo is None or prefix > lo else lo
        p_end = _prefix_end(prefix)
        if p_end is not None and (hi is None or p_end < hi):
            hi = p_end
    return lo, hi


def epoch_ms(when: datetime | float, what: str = "set_alarm") -> int:
    """``when`` (an aware datetime or epoch milliseconds, as ``what()`` takes it) in epoch ms."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            msg = f"{what}(): give an aware datetime (with tzinfo) or epoch milliseconds"
            raise InvalidArgumentError(msg)
        return int(when.timestamp() * 1000)
    if isinstance(when, int | float) and not isinstance(when, bool) and math.isfinite(when):
        return int(when)
    msg = f"{what}() takes a datetime or epoch milliseconds, got {when!r}"
    raise InvalidArgumentError(msg)


class DurableObjectStorage:
    """``ctx.storage`` of one object; made when first used, forgotten when it hibernates."""

    def __init__(self, host: StoragePort) -> None:
        self._host = host
        self._object = object_key(host.id)
        #: This turn's writes, not yet submitted.
        self._pending: Batch | None = None
        #: Submitted batches, oldest first, until their commit returns.
        self._in_flight: list[Batch] = []
        #: Committed values known to be current: key -> encoded value, or None if absent.
        self._cache: dict[str, bytes | None] = {}
        #: Bumped by every commit, so a read that raced one does not fill the cache.
        self._generation = 0
        self._transactions = 0
        #: Committed bytes of this object (for the quotas), once read from the backend.
        self._usage: int | None = None

    # -- reading ---------------------------------------------------------------------

    def _overlay(self, key: str) -> tuple[bool, bytes | None]:
        """``(True, value or None if deleted)`` from uncommitted batches, else ``(False, None)``."""
        batches = self._batches()
        for batch in reversed(batches):
            if key in batch.writes:
                return True, batch.writes[key]
            if batch.clear:
                return True, None
        return False, None

    def _batches(self) -> list[Batch]:
        """The uncommitted batches, oldest first: those in flight, then this turn's."""
        return [*self._in_flight, self._pending] if self._pending else self._in_flight

    async def _read(self, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        unknown = []
        for key in keys:
            known, value = self._overlay(key)
            if not known and key in self._cache:
                known, value = True, self._cache[key]
            if not known:
                unknown.append(key)
            elif value is not None:
                found[key] = value
        if unknown:
            generation = self._generation
            rows = await self._host.read(self._object, unknown)
            for key in unknown:
                # Writes made while the read ran win over what it found.
                known, value = self._overlay(key)
                if not known:
                    value = rows.get(key)
                    if generation == self._generation:
                        self._remember(key, value)
                if value is not None:
                    found[key] = value
        return {k: found[k] for k in keys if k in found}

    def _remember(self, key: str, value: bytes | None) -> None:
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value

    async def get(self, key: str | Iterable[str]) -> Any:
        """The value of ``key`` (None if absent), or a dict of the found keys of a list."""
        if isinstance(key, str):
            found = await self._read([check_key(key)])
            return codec.decode(found[key]) if key in found else None
        keys = check_keys(key, "get")
        return {k: codec.decode(v) for k, v in (await self._read(keys)).items()}

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """Keys and values in key order (descending if ``reverse``): those that start with
        ``prefix``, are ``>= start`` and ``< end``; at most ``limit`` of them."""
        lo, hi = list_range(prefix, start, end, limit)

        def wanted(key: str) -> bool:
            return (lo is None or key >= lo) and (hi is None or key < hi) and (prefix is None or key.startswith(prefix))

        batches = self._batches()
        cleared_at = max((i for i, b in enumerate(batches) if b.clear), default=-1)
        merged: dict[str, bytes | None] = {}
        if cleared_at < 0:
            # Overlay deletions may hide rows, so ask for that many more.
            hidden = sum(1 for b in batches for k, v in b.writes.items() if v is None and wanted(k))
            want = None if limit is None else limit + hidden
            for key, stored in await self._host.scan(self._object, lo, hi, want, reverse):
                if wanted(key):
                    merged[key] = stored
        for batch in batches[max(cleared_at, 0) :]:
            for key, written in batch.writes.items():
                if wanted(key):
                    merged[key] = written
        keys = sorted((k for k, v in merged.items() if v is not None), reverse=reverse)
        if limit is not None:
            keys = keys[:limit]
        out: dict[str, Any] = {}
        for key in keys:
            data = merged[key]
            assert data is not None
            out[key] = codec.decode(data)
        return out

    # -- writing ------------------------------------------------------------------------

    def _batch(self) -> Batch:
        if self._pending is None:
            self._pending = Batch(self._object)
            self._host.batch_started()
            self._commit_outside_a_turn()
        return self._pending

    def _commit_outside_a_turn(self) -> None:
        """Writes outside the object's own turn (a wait_until task) commit on their own, soon;
        inside a transaction, once it ends (it may still roll them back)."""
        if self._host.in_own_turn():
            return  # the turn's end commits them
        if not self._transactions:
            self._host.flush_soon(self)

    async def put(self, key: str | Mapping[str, Any], value: Any = MISSING) -> None:
        """Store ``value`` at ``key``, or every item of a dict (at most 128)."""
        encoded = encode_entries(key, value)
        growth = 0
        for k, data in encoded.items():
            known, old = self._overlay(k)
            if not known:
                old = self._cache.get(k)  # unknown (not read): counted as a new entry
            growth += entry_bytes(k, data) - (entry_bytes(k, old) if old is not None else 0)
        if growth > 0:
            await self._check_quotas(growth)
        batch = self._batch()
        batch.writes.update(encoded)
        batch.growth += growth

    async def delete(self, key: str | Iterable[str]) -> bool | int:
        """Delete ``key`` (True if it existed) or every key of a list (how many existed)."""
        keys = [check_key(key)] if isinstance(key, str) else check_keys(key, "delete")
        existed = await self._read(keys)
        batch = self._batch()
        for k in keys:
            batch.writes[k] = None
        batch.growth -= sum(entry_bytes(k, v) for k, v in existed.items())
        return key in existed if isinstance(key, str) else len(existed)

    async def delete_all(self) -> None:
        """Delete every key of this object (the alarm stays; use delete_alarm())."""
        batch = self._batch()
        batch.clear = True
        batch.writes.clear()
        batch.growth = 0  # counted from nothing (see _estimated_usage)

    async def transaction(self, fn: Callable[[Transaction], Awaitable[T] | T]) -> T:
        """Run ``fn(txn)``; if it raises or calls ``txn.rollback()``, none of its writes stay."""
        saved = self._snapshot()
        txn = Transaction(self)
        self._transactions += 1
        try:
            result = fn(txn)
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            self._restore(saved)
            raise
        finally:
            self._transactions -= 1
            txn.close()
        if txn.rolled_back:
            self._restore(saved)
        if self._transactions == 0 and self._pending is not None:
            # What waited for the transaction (its writes, or writes made just before it whose
            # commit found it open) commits now; an emptied batch too, to release its pin.
            self._commit_outside_a_turn()
        return result

    def _snapshot(self) -> tuple[bool, dict[str, bytes | None], Any, int] | None:
        p = self._pending
        return None if p is None else (p.clear, dict(p.writes), p.alarm, p.growth)

    def _restore(self, saved: tuple[bool, dict[str, bytes | None], Any, int] | None) -> None:
        p = self._pending
        if saved is None:
            if p is not None:
                p.clear, p.writes, p.alarm, p.growth = False, {}, ..., 0
            return
        assert p is not None
        p.clear, p.writes, p.alarm, p.growth = saved

    # -- quotas ---------------------------------------------------------------------------

    async def _committed_usage(self) -> int:
        while self._usage is None:
            generation = self._generation
            usage = await self._host.usage(self._object)
            if generation == self._generation:  # no commit changed it meanwhile
                self._usage = usage
        return self._usage

    def _estimated_usage(self, committed: int) -> int:
        """Committed bytes plus what the uncommitted batches add (from the last delete_all)."""
        total = committed
        for batch in self._batches():
            total = batch.growth if batch.clear else total + batch.growth
        return total

    async def _check_quotas(self, growth: int) -> None:
        limits = self._host.limits
        if limits.object_storage_bytes is None and limits.storage_bytes is None:
            return
        committed = await self._committed_usage()
        mine = self._estimated_usage(committed)
        wanted = mine + growth
        everyone = self._host.stored_bytes() - committed + wanted
        for which, quota, size, whose, option in (
            ("object", limits.object_storage_bytes, wanted, "this object", "its quota is"),
            ("total", limits.storage_bytes, everyone, "all objects", "the quota is"),
        ):
            if quota is not None and size > quota:
                flag = "--max-object-storage" if which == "object" else "--max-storage"
                msg = (
                    f"put(): {whose} would store {size:,} bytes; {option} {quota:,} ({flag}); "
                    "nothing was stored, delete data to make room"
                )
                self._host.quota_refused(which, msg)
                raise QuotaExceededError(msg)

    async def sync(self) -> None:
        """Wait until every write made so far is durable."""
        await self._host.flush(self)

    # -- alarm ----------------------------------------------------------------------------

    async def get_alarm(self) -> int | None:
        """When the alarm will go off, in epoch milliseconds, or None."""
        batches = self._batches()
        for batch in reversed(batches):
            if batch.alarm is not ...:
                return batch.alarm.at_ms if isinstance(batch.alarm, AlarmRow) else None
        return self._host.alarm_at(self._object)

    async def set_alarm(self, when: datetime | float) -> None:
        """Call the object's ``alarm()`` at ``when`` (an aware datetime or epoch ms); one per object."""
        at_ms = epoch_ms(when)
        hid = self._host.id
        self._batch().alarm = AlarmRow(self._object, hid.namespace, hid.hex, hid.name, at_ms)

    async def delete_alarm(self) -> None:
        self._batch().alarm = None

    # -- for the runtime ------------------------------------------------------------------

    def clear_spent_alarm(self) -> None:
        """The alarm ran: delete it in this turn's batch, unless the turn set or deleted it."""
        if not self.alarm_touched():
            self._batch().alarm = None

    def alarm_touched(self) -> bool:
        """Whether an uncommitted batch sets or deletes the alarm."""
        batches = self._batches()
        return any(b.alarm is not ... for b in batches)

    def in_flight(self) -> bool:
        return bool(self._in_flight)

    def has_unflushed(self) -> bool:
        """Whether a batch was started and not yet taken for a commit. An emptied one counts
        (all of a transaction's writes rolled back): its flush releases what it held back."""
        return self._pending is not None

    def busy(self) -> bool:
        return self._pending is not None or bool(self._in_flight)

    def take_pending(self) -> Batch | None:
        batch, self._pending = self._pending, None
        if batch is None or batch.empty():
            return None
        self._in_flight.append(batch)
        return batch

    def committed(self, batch: Batch, change: int) -> None:
        """``batch`` is durable; it changed this object's stored bytes by ``change``."""
        self._in_flight.remove(batch)
        if self._usage is not None:
            self._usage += change
        self._generation += 1
        if batch.clear:
            self._cache.clear()
        for key, value in batch.writes.items():
            self._remember(key, value)

    def failed(self, batch: Batch) -> None:
        self._in_flight.remove(batch)
        self._cache.clear()
        self._generation += 1

    def discard_pending(self) -> None:
        self._pending = None

    @property
    def in_transaction(self) -> bool:
        return self._transactions > 0

    def close(self) -> None:
        """The object hibernates or is reset (an object with its own database closes it)."""

    async def commit_database(self) -> None:
        """Commit the object's own database, if it has one (after :meth:`take_pending`)."""

    # -- SQL storage (a class with ``storage = "sql"``: wsecho.api.sql) --------------------

    @property
    def sql(self) -> Any:
        msg = f'ctx.storage.sql needs SQL storage: set storage = "sql" on {self._host.id.namespace}\'s class'
        raise InvalidStateError(msg)

    def transaction_sync(self, fn: Callable[[], T]) -> T:
        msg = f'transaction_sync() needs SQL storage: set storage = "sql" on {self._host.id.namespace}\'s class'
        raise InvalidStateError(msg)


class Transaction:
    """The ``txn`` a ``transaction(fn)`` callback gets: the storage API plus ``rollback()``."""

    def __init__(self, storage: DurableObjectStorage) -> None:
        self._storage = storage
        self._rolled_back = False
        self._closed = False

    def _live(self) -> DurableObjectStorage:
        if self._closed:
            msg = "this transaction is over; use ctx.storage"
            raise InvalidStateError(msg)
        return self._storage

    def rollback(self) -> None:
        """Undo every write of this transaction when ``fn`` returns."""
        self._rolled_back = True

    @property
    def rolled_back(self) -> bool:
        return self._rolled_back

    def close(self) -> None:
        """``fn`` returned: the transaction takes no more calls."""
        self._closed = True

    async def get(self, key: str | Iterable[str]) -> Any:
        return await self._live().get(key)

    async def put(self, key: str | Mapping[str, Any], value: Any = MISSING) -> None:
        await self._live().put(key, value)

    async def delete(self, key: str | Iterable[str]) -> bool | int:
        return await self._live().delete(key)

    async def delete_all(self) -> None:
        await self._live().delete_all()

    async def list(self, **options: Any) -> dict[str, Any]:
        return await self._live().list(**options)

    async def get_alarm(self) -> int | None:
        return await self._live().get_alarm()

    async def set_alarm(self, when: datetime | float) -> None:
        await self._live().set_alarm(when)

    async def delete_alarm(self) -> None:
        await self._live().delete_alarm()
