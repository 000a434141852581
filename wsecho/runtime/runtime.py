"""The runtime: finds, wakes, feeds, resets and hibernates objects. Knows nothing of Tornado.

Each object has an :class:`ObjectHost` that outlives its instance: it holds the
object's :class:`~wsecho.core.lifecycle.ObjectLifecycle`, its sockets (with their
tags), its auto-response and event timeout, and the instance while there is
one. Every event (an HTTP request or RPC call through a stub, a message, a
close, an error) enters through :meth:`Runtime.submit`; the lifecycle answers
with effects, which :meth:`Runtime._run` carries out. Both clocks are injected,
so tests drive ``sweep(now=...)`` without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import types
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Generator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from wsecho.api.http import Request, Response
from wsecho.api.ids import DurableObjectId
from wsecho.api.objects import DurableObjectNamespace, DurableObjectState, Env
from wsecho.api.storage import DurableObjectStorage
from wsecho.api.websocket import CURRENT_OWNER, HeldFanout, SocketLink, WebSocketRequestResponsePair
from wsecho.backends.base import Backend, MemoryBackend
from wsecho.backends.objectdb import ObjectDatabases, databases_for
from wsecho.core.alarms import MAX_RETRIES, AlarmSchedule, Due, retry_delay_ms
from wsecho.core.batches import Batch
from wsecho.core.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidStateError,
    NotOwnerError,
    ObjectResetError,
    StorageError,
    WebSocketProtocolError,
)
from wsecho.core.idle import IdleIndex
from wsecho.core.lifecycle import (
    BecameIdle,
    CloseSockets,
    Deliver,
    DropEvents,
    DropInstance,
    Effect,
    Final,
    ObjectState,
    RunConstructor,
    SocketInput,
    SocketState,
)
from wsecho.core.limits import Limits
from wsecho.core.placement import slot_of
from wsecho.core.stats import Stats
from wsecho.core.wording import counted
from wsecho.runtime.commits import GroupCommitter

if TYPE_CHECKING:
    from wsecho.api.app import App
    from wsecho.api.objects import DurableObject
    from wsecho.api.websocket import Transport

from wsecho.runtime.host import (
    PIN_NON_HIBERNATABLE,
    PIN_STORAGE,
    PIN_WAIT_UNTIL,
    AlarmEvent,
    BlockEvent,
    CallEvent,
    CloseEvent,
    ErrorEvent,
    Event,
    HttpEvent,
    MessageEvent,
    ObjectHost,
    RpcEvent,
    SocketEvent,
)

log = logging.getLogger("wsecho")

T = TypeVar("T")

#: Queued events per object beyond which a socket that adds one stops being read.
QUEUE_HIGH_WATER = 100
#: Events held during a code reload beyond which a socket that adds one stops being read.
HELD_HIGH_WATER = 10_000


#: How often a code reload checks whether every running turn has finished.
QUIESCE_POLL = 0.01
#: How often a write is tried while storage is failing, to notice that it works again.
STORAGE_PROBE_INTERVAL = 2.0
#: At most one log line per this many seconds about the total storage quota.
QUOTA_LOG_INTERVAL = 60.0
#: Seconds between two sweeps that read again what all processes store, while this process
#: is near the total quota or refused a write by it (other processes may have deleted data).
STORAGE_RECOUNT_INTERVAL = 1.0
#: At most one log line per this many seconds about objects built over --max-active-objects.
OVER_LIMIT_LOG_INTERVAL = 60.0
#: The storage key of the probe's row (no object's key: those are ``namespace:hex``).
PROBE_OBJECT = "wsecho:probe"


#: Who serves an object this process does not: the index of another worker of this machine
#: (``--workers N``), or the name of another member of the cluster.
Owner = int | str


class Ownership(Protocol):
    """Which objects this process may serve: a worker's fixed share
    (:class:`~wsecho.core.placement.Placement`) or a cluster member's proven leases."""

    def is_local(self, hex_id: str) -> bool: ...

    def owner(self, hex_id: str) -> Owner | None:
        """The worker of this machine (its index) or the cluster member (its name) that serves
        it, or None when no other process can be reached for it."""
        ...


class Remote(Protocol):
    """How a process reaches the objects others own: the workers of this machine (``--workers
    N``, the serve layer's mesh) and the other members of a cluster (its peer channel)."""

    async def fetch_object(self, owner: Owner, id: DurableObjectId, request: Request) -> Response: ...  # noqa: A002

    async def call_object(
        self,
        owner: Owner,
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any: ...


class Dialer(Protocol):
    """How the runtime opens a client WebSocket for ``ctx.connect_web_socket`` (the serve
    layer's :class:`~wsecho.serve.outbound.Dialer`, carrying frames with Tornado)."""

    @property
    def open(self) -> int:
        """Outbound connections open (or opening) in this process."""
        ...

    async def connect(self, link: SocketLink, url: str, protocols: tuple[str, ...], headers: dict[str, str]) -> None:
        """Open the connection; once the upstream answered 101, call :meth:`Runtime.outbound_opened`
        before any frame of it is read. Raises ``OutboundConnectError`` when it cannot."""
        ...


class Runtime:
    """All objects of one application in one process (or, with ``placement``, the objects of
    one worker's slots; ``remote`` reaches the others)."""

    def __init__(
        self,
        app: App,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
        hibernate_after: float = 10.0,
        limits: Limits | None = None,
        backend: Backend | None = None,
        placement: Ownership | None = None,
        remote: Remote | None = None,
        guard_events: bool = False,
        max_active_objects: int = 0,
    ) -> None:
        self.app = app
        #: Which objects this process owns (None: all of them).
        self.placement = placement
        self.remote = remote
        self._guard: Callable[[str], bool] | None = None
        self.set_ownership(placement, remote, guard_events=guard_events)
        self.clock = clock
        self.wall_clock = wall_clock
        self.hibernate_after = hibernate_after
        self.limits = limits or Limits()
        self.namespaces = {name: DurableObjectNamespace(name, cls, self) for name, cls in app.bindings.items()}
        self.env = Env({**app.vars, **self.namespaces})
        self._hosts: dict[DurableObjectId, ObjectHost] = {}
        self._idle: IdleIndex[ObjectHost] = IdleIndex()
        #: Objects ``ctx.keep_awake_until()`` keeps out of the idle index, and the earliest time.
        self._kept_awake: dict[ObjectHost, None] = {}
        self._kept_awake_next = math.inf
        #: Objects with an instance (or one being built), for ``--max-active-objects`` (0: no limit).
        self._awake: dict[ObjectHost, None] = {}
        self.max_active_objects = max_active_objects
        #: The same kind of cap, set by memory-pressure eviction while memory is high (None: none).
        self.memory_cap: int | None = None
        self._over_limit_logged_at = -OVER_LIMIT_LOG_INTERVAL
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self.committer = GroupCommitter(self.backend)
        self.databases: ObjectDatabases | None = databases_for(self.backend)
        self._check_storage_kinds()
        self.committer.on_health = self._storage_health
        self._probe_timer: asyncio.TimerHandle | None = None
        #: Seconds between the writes that probe a failing storage.
        self.storage_probe_interval = STORAGE_PROBE_INTERVAL
        self._quota_logged_at = -QUOTA_LOG_INTERVAL
        self.committer.quota = self.limits.storage_bytes
        self._recounted_at = -STORAGE_RECOUNT_INTERVAL
        #: Whether the total quota refused a write since the last periodic recount.
        self._total_refused = False
        self.stats = Stats()
        #: During a code reload: the events that arrived, in order, to deliver after it.
        self._held: deque[tuple[ObjectHost, Event]] | None = None
        #: After a code reload: each replaced class, by the one that replaced it (an object
        #: still awake then wakes with the new class; see ``_class_now``).
        self._replaced: dict[type[DurableObject], type[DurableObject]] = {}
        #: Every stored alarm, by object key.
        self.alarms = AlarmSchedule()
        self._alarm_timer: asyncio.TimerHandle | None = None
        #: Opens ``ctx.connect_web_socket``'s connections; the serve layer sets it (set_dialer).
        self.dialer: Dialer | None = None

    def _check_storage_kinds(self, app: App | None = None) -> None:
        """Refuse at start a class whose ``storage`` this server cannot give (decision 0008)."""
        for name, cls in (app or self.app).bindings.items():
            kind = cls.storage
            if kind not in ("kv", "sql"):
                msg = f'{cls.__name__} (bound as {name}) has storage = {kind!r}; use "kv" or "sql"'
                raise ConfigError("storage", msg)
            if kind == "sql" and self.databases is None:
                msg = (
                    f'{cls.__name__} (bound as {name}) declares storage = "sql", and this server keeps '
                    f"objects' data in {type(self.backend).__name__}, which has no database per object; "
                    "SQL storage needs --storage sqlite (the default) or --data-dir :memory:"
                )
                raise ConfigError("storage", msg)

    async def start(self) -> None:
        """Open storage and schedule the stored alarms (those missed while down fire now)."""
        rows = await self.backend.open()
        if self.placement is not None:
            # The other workers fire their own objects' alarms.
            rows = [row for row in rows if self.placement.is_local(row.id)]
        self.committer.stored_bytes = await self.backend.usage(None)
        for row in rows:
            self.alarms.set(row)
        if rows:
            log.info("loaded %d stored alarms", len(rows))
        self._arm_alarms()

    async def close(self) -> None:
        """Commit every write still pending, then close storage."""
        if self._alarm_timer is not None:
            self._alarm_timer.cancel()
            self._alarm_timer = None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for host in list(self._hosts.values()):
            if host.storage is not None and host.storage.busy():
                with contextlib.suppress(StorageError):
                    await self.flush_storage(host, host.storage)
        await self.committer.idle()
        for host in self._hosts.values():
            if host.storage is not None:
                host.storage.close()
        if self.databases is not None:
            self.databases.shutdown()
        await self.backend.close()

    # -- entry points -----------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        """Run the worker's ``fetch(request, env)``; exceptions reach the caller."""
        result = self.app.fetch(request, self.env)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, Response):
            msg = f"the worker's fetch() must return a wsecho.Response, got {type(result).__name__}"
            raise TypeError(msg)
        return result

    async def fetch_object(
        self,
        cls: type[DurableObject],
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        request: Request,
    ) -> Response:
        owner = self._owner(id)
        if owner is not None:
            assert self.remote is not None
            return await self.remote.fetch_object(owner, id, request)
        host = self._callable_host(id, cls, "fetch")
        reply: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.submit(host, HttpEvent(reply, request))
        if reply.done():
            return reply.result()  # answered within submit(): no trip through the event loop
        return await reply

    async def call_object(
        self,
        cls: type[DurableObject],
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """An RPC call through a stub, delivered in the object's turn."""
        owner = self._owner(id)
        if owner is not None:
            assert self.remote is not None
            return await self.remote.call_object(owner, id, method, args, kwargs)
        host = self._callable_host(id, cls, method)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(host, RpcEvent(reply, method, args, kwargs))
        return await reply

    def set_ownership(self, placement: Ownership | None, remote: Remote | None, *, guard_events: bool) -> None:
        """Which objects this process serves; ``guard_events``: check before every event (a
        cluster member's leases can run out; a worker's share never changes)."""
        self.placement = placement
        self.remote = remote
        self._guard = placement.is_local if placement is not None and guard_events else None

    def _owner(self, id: DurableObjectId) -> Owner | None:  # noqa: A002
        """Who serves ``id`` when it is another process (a worker here, a member elsewhere),
        else None; NotOwnerError when no other process can be reached for it."""
        placement = self.placement
        if placement is None or placement.is_local(id.hex):
            return None
        owner = placement.owner(id.hex)
        if owner is None or self.remote is None:
            raise self._not_owner(id)
        return owner

    def _not_owner(self, id: DurableObjectId) -> NotOwnerError:  # noqa: A002
        placement = self.placement
        owner = None if placement is None else placement.owner(id.hex)
        where = f"worker {owner}" if isinstance(owner, int) else "another member of the cluster"
        return NotOwnerError(f"{id!r} (slot {slot_of(id.hex)}) is served by {where}, not by this process", id.hex)

    def _callable_host(self, id: DurableObjectId, cls: type[DurableObject], what: str) -> ObjectHost:  # noqa: A002
        host = self.host(id, cls)
        if CURRENT_OWNER.get() is host and host.lifecycle.current is not None:
            msg = (
                f"{cls.__name__}: calling {what}() on your own stub from inside a handler would wait "
                "for the handler itself (events are delivered one at a time); call the method directly"
            )
            raise InvalidStateError(msg)
        return host

    def host(self, id: DurableObjectId, cls: type[DurableObject]) -> ObjectHost:  # noqa: A002
        """The host of object ``id``, created (hibernating, no instance) on first use."""
        host = self._hosts.get(id)
        if host is None:
            if self.placement is not None and not self.placement.is_local(id.hex):
                # One live instance per object: only its owner may ever build one.
                raise self._not_owner(id)
            host = self._hosts[id] = ObjectHost(id, cls, self, self._hibernate_after_of(cls))
        return host

    def _hibernate_after_of(self, cls: type[DurableObject]) -> float:
        return float(cls.hibernate_after if cls.hibernate_after is not None else self.hibernate_after)

    def set_hibernate_after(self, seconds: float) -> None:
        """A new default idle time; objects whose class sets its own keep theirs."""
        self.hibernate_after = seconds
        for host in self._hosts.values():
            if host.cls.hibernate_after is None:
                host.hibernate_after = seconds

    def hosts(self) -> list[ObjectHost]:
        return list(self._hosts.values())

    def find(self, namespace: str, name: str) -> ObjectHost | None:
        """The host of the object ``name`` in ``namespace``, if it is in memory or has sockets."""
        return self._hosts.get(self.namespaces[namespace].id_from_name(name))

    def socket_count(self) -> int:
        return sum(len(h.sockets) for h in self._hosts.values())

    def close_all(self, code: int, reason: str) -> None:
        """Close every open WebSocket of every object (a graceful shutdown)."""
        for host in list(self._hosts.values()):
            for link in list(host.sockets):
                if link.state in (SocketState.OPEN, SocketState.CLOSE_RECEIVED, SocketState.CONNECTING):
                    link.close_now(code, reason)

    def submit(self, host: ObjectHost, event: Event) -> None:
        """Hand ``event`` to its object: wake it if needed, deliver in arrival order."""
        if self._guard is not None and (why := self._lease_lost(host)) is not None:
            event.dropped(why)
            return
        if self._held is not None and CURRENT_OWNER.get() is None:
            # A code reload is under way: no new turn starts (except those a running turn
            # waits for, such as a call to another object, which the reload waits for too).
            self._held.append((host, event))
            return
        if host.lifecycle.try_start(event):  # an awake, idle object: its turn starts now
            self._run(host, self._deliver(host, event))
        else:
            self._run(host, host.lifecycle.event_arrived(event, self.clock()))

    def _lease_lost(self, host: ObjectHost) -> str | None:
        """Why this process may no longer act for ``host`` (a cluster member that cannot prove
        the lease of its slot: the database is unreachable, or the process was paused past the
        lease), after dropping the slot's objects; None while it may act."""
        guard = self._guard
        if guard is None or guard(host.id.hex):
            return None
        why = f"this process no longer holds the lease of slot {slot_of(host.id.hex)}"
        self.drop_slots({slot_of(host.id.hex)}, why)
        return why

    def _resume_check(self, host: ObjectHost) -> Callable[[], str | None] | None:
        """What a suspended turn of ``host`` asks before each step (None: nothing to ask)."""
        if self._guard is None:
            return None

        def check() -> str | None:
            why = self._lease_lost(host)
            return None if why is None else f"{host.cls.__name__} {host.id} was reset: {why}"

        return check

    def hibernate(self, host: ObjectHost) -> None:
        """Hibernate ``host`` now (like a sweep would, for this object only).

        Raises :class:`InvalidStateError` naming what keeps it awake (an event being
        handled, queued events, ``wait_until`` work, ...); a hibernating object is left as it is.
        """
        if host.lifecycle.state is ObjectState.HIBERNATING:
            return
        self._run(host, host.lifecycle.evict(self.clock()))
        self.stats.evictions["idle"] += 1

    async def barrier(self, host: ObjectHost) -> None:
        """Return once every event queued for ``host`` before this call has been handled
        (its writes committed): an empty turn behind them, since delivery is in order."""
        if host.lifecycle.busy():
            reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.submit(host, BlockEvent(reply, _nothing))
            await reply

    def hibernate_soon(self, host: ObjectHost) -> None:
        """``ctx.hibernate_now()``: hibernate ``host`` at once if it is idle (a call from a task
        of its own), else the moment it is (see ``_became_idle``)."""
        if host.awake_until is not None:
            self._stop_keeping_awake(host)
        if self.hibernation_blocker(host) is None:
            self.hibernate(host)
        else:
            host.hibernate_soon = True

    def keep_awake_until(self, host: ObjectHost, at_ms: int | None) -> None:
        """``ctx.keep_awake_until()``: ``host`` is not hibernated for being idle before ``at_ms``."""
        host.hibernate_soon = False
        now = self.clock()
        at = None if at_ms is None else now + (at_ms / 1000 - self.wall_clock().timestamp())
        if at is None or at <= now:
            if host.awake_until is not None:
                self._stop_keeping_awake(host)
                self._index_if_idle(host, now)
            return
        host.awake_until = at
        self._kept_awake[host] = None
        self._kept_awake_next = min(self._kept_awake_next, at)
        self._idle.discard(host)

    def _stop_keeping_awake(self, host: ObjectHost) -> None:
        host.awake_until = None
        self._kept_awake.pop(host, None)

    def _index_if_idle(self, host: ObjectHost, since: float) -> None:
        """Put an idle object whose idle time was held back in the idle index, from ``since``."""
        lc = host.lifecycle
        if lc.idle_since is not None and lc.hibernation_blocker() is None:
            self._idle.touch(host, max(host.hibernate_after, 0.0), max(since, lc.idle_since))

    def _release_kept_awake(self, now: float) -> None:
        """The objects whose ``keep_awake_until`` time has come are idle objects again."""
        upcoming = math.inf
        for host in list(self._kept_awake):
            at = host.awake_until
            assert at is not None
            if at > now:
                upcoming = min(upcoming, at)
                continue
            self._stop_keeping_awake(host)
            self._index_if_idle(host, at)
        self._kept_awake_next = upcoming

    def sweep(self, now: float | None = None) -> int:
        """Hibernate every object idle for its ``hibernate_after`` at ``now``; return how many."""
        if now is None:
            now = self.clock()
        if now >= self._kept_awake_next:
            self._release_kept_awake(now)
        self._recount_storage(now)
        evicted = 0
        for host in self._idle.pop_due(now):
            # An object that is busy again is re-indexed when it next becomes idle.
            if self.hibernation_blocker(host) is not None:
                continue
            self._run(host, host.lifecycle.evict(now))
            evicted += 1
        if evicted:
            self.stats.evictions["idle"] += evicted
            log.info("hibernated %s (%d remain in memory)", counted(evicted, "idle object"), len(self._idle))
        return evicted

    def _recount_storage(self, now: float) -> None:
        """Other processes (workers, cluster members) on the same database store and delete
        too: near the total quota, or once it refused a write, read the total again."""
        quota = self.limits.storage_bytes
        if quota is None or now < self._recounted_at + STORAGE_RECOUNT_INTERVAL:
            return
        self._recounted_at = now
        if self._total_refused or self.committer.stored_bytes > quota - quota // 8:
            self._total_refused = False
            self.committer.recount()

    # -- code reload (docs/decisions/0009-reload-code.md) ---------------------------------

    def check_classes(self, app: App) -> None:
        """Raise :class:`ConfigError` if ``app`` (re-imported) cannot replace the running one:
        a binding it no longer has (its objects' sockets would have no code), or a class
        whose ``storage`` kind changed or cannot be given."""
        for name, ns in self.namespaces.items():
            cls = app.bindings.get(name)
            if cls is None:
                msg = (
                    f"the new code has no binding {name!r} (it had {ns.object_class.__name__}); "
                    "removing a class needs a restart, after its objects' sockets are gone"
                )
                raise ConfigError("reload", msg)
            if cls.storage != ns.object_class.storage:
                msg = (
                    f"{cls.__name__} (bound as {name}) changed storage from {ns.object_class.storage!r} "
                    f"to {cls.storage!r}; that needs a restart"
                )
                raise ConfigError("reload", msg)
        self._check_storage_kinds(app)

    def hold_events(self) -> None:
        """Start a code reload: events are held, in arrival order, until ``release_events``."""
        if self._held is None:
            self._held = deque()

    async def quiesce(self, timeout: float) -> list[ObjectHost]:
        """Wait (at most ``timeout`` seconds) until no object handles, has queued or commits
        anything, then hibernate every object that can be; return those left awake (a
        non-hibernatable socket, ``wait_until`` work, or a turn still running at the bound)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline and any(self._still_working(h) for h in self._hosts.values()):
            await asyncio.sleep(QUIESCE_POLL)
        awake = []
        for host in list(self._hosts.values()):
            if host.lifecycle.state is ObjectState.HIBERNATING:
                continue
            if self.hibernation_blocker(host) is None:
                self.hibernate(host)
            else:
                awake.append(host)
        return awake

    @staticmethod
    def _still_working(host: ObjectHost) -> bool:
        lc = host.lifecycle
        return lc.busy() or PIN_STORAGE in lc.pins or bool(host.blockers)

    def rebind(self, app: App) -> None:
        """Serve ``app`` (checked by ``check_classes``): its classes build every next instance."""
        replaced = self._replaced
        for name, cls in app.bindings.items():
            ns = self.namespaces.get(name)
            if ns is None:
                self.namespaces[name] = DurableObjectNamespace(name, cls, self)
                continue
            old = ns.object_class
            ns.bind_class(cls)
            for was, now in list(replaced.items()):
                if now is old:
                    replaced[was] = cls
            replaced[old] = cls
        self.app = app
        self.env = Env({**app.vars, **self.namespaces})
        in_use = set()
        held = [host for host, _ in self._held or ()]
        for host in itertools.chain(self._hosts.values(), held):
            if host.instance is None:
                self._class_now(host)
            else:
                in_use.add(host.cls)
        # Only the classes of instances still alive need to be looked up later.
        self._replaced = {was: now for was, now in replaced.items() if was in in_use}

    def _class_now(self, host: ObjectHost) -> None:
        """Give ``host`` (about to be constructed) the class that replaced its own, if any."""
        new = self._replaced.get(host.cls)
        if new is not None and new is not host.cls:
            host.take_class(new, self._hibernate_after_of(new))

    def release_events(self) -> int:
        """End a code reload: deliver the held events, in order; return how many."""
        held, self._held = self._held, None
        for host, event in held or ():
            # A host with nothing left may have been forgotten meanwhile: it is the same object.
            self.submit(self._hosts.setdefault(host.id, host), event)
        return len(held or ())

    # -- bounded memory (docs/decisions/0010) ------------------------------------------

    def cap_active(self, cap: int | None) -> None:
        """Memory pressure: keep at most ``cap`` objects in memory (waking one more hibernates
        the least recently used, like ``--max-active-objects``) until ``cap_active(None)``."""
        self.memory_cap = None if cap is None else max(cap, 1)

    def active_count(self) -> int:
        """How many objects have an instance in memory (or are building one)."""
        return len(self._awake)

    def _admit(self, host: ObjectHost) -> None:
        """``host`` is about to be built: with ``--max-active-objects`` reached, hibernate the
        least recently used objects that may hibernate (more than one when earlier wakes went
        over the limit); if too few may, build it anyway (over the limit, counted and logged)
        rather than refuse its traffic."""
        limit, reason = self.max_active_objects, "limit"
        cap = self.memory_cap
        if cap is not None and (not limit or cap < limit):
            limit, reason = cap, "memory"
        if not limit or len(self._awake) < limit:
            self._awake[host] = None
            return
        excess = len(self._awake) - limit + 1
        if self.evict_lru(excess, reason) < excess and reason == "limit":
            self.stats.over_limit += 1
            now = self.clock()
            if now - self._over_limit_logged_at >= OVER_LIMIT_LOG_INTERVAL:
                self._over_limit_logged_at = now
                log.warning(
                    "%s in memory, over --max-active-objects %d: too few of them can hibernate now "
                    "(/objects says why); woke %s %s anyway",
                    counted(len(self._awake) + 1, "object"),
                    limit,
                    host.cls.__name__,
                    host.id,
                )
        self._awake[host] = None

    def evict_lru(self, count: int, reason: str) -> int:
        """Hibernate up to ``count`` objects, least recently used first, counted under
        ``reason``; return how many. Objects that cannot hibernate are skipped, and those
        ``ctx.keep_awake_until()`` keeps awake go only after every other idle one."""
        evicted = 0
        now = self.clock()
        while evicted < count:
            host = self._least_recently_used()
            if host is None:
                break
            self._run(host, host.lifecycle.evict(now))
            evicted += 1
        if evicted:
            self.stats.evictions[reason] += evicted
        return evicted

    def _least_recently_used(self) -> ObjectHost | None:
        # The idle index is ordered by when each object last finished a turn. An object in it
        # that is busy again leaves it here; it comes back when its turn ends (_became_idle).
        idle = self._idle
        while (host := idle.oldest()) is not None:
            if self.hibernation_blocker(host) is None:
                return host
            idle.discard(host)
        for host in self._kept_awake:
            if self.hibernation_blocker(host) is None:
                return host
        return None

    def hibernation_blocker(self, host: ObjectHost) -> str | None:
        """Why ``host`` may not be hibernated now (None: it may). The one answer for the sweep,
        ``ctx.hibernate_now()``, a code reload, least-recently-used and memory eviction, and
        ``/objects``: the object's own state (an event handled or queued, a pin such as a
        non-hibernatable socket or ``wait_until`` work) and what only the runtime knows
        (``block_concurrency_while()`` work, a turn whose writes are being committed)."""
        lc = host.lifecycle
        if lc.state is ObjectState.WAKING and host.blockers:
            return "block_concurrency_while() in its constructor is running"
        current = lc.current
        if type(current) is BlockEvent:
            return "block_concurrency_while() is running"
        if current is not None:
            if host.storage is not None and host.storage.busy():
                return f"the writes of its {current.name} turn are being committed"
            return f"its {current.name} turn is running"
        return lc.hibernation_blocker()

    # -- storage ------------------------------------------------------------------------

    def batch_started(self, host: ObjectHost) -> None:
        """A write started a new batch: close the output gate and keep the object in memory."""
        if host.gate is None:
            host.gate = []
        if PIN_STORAGE not in host.lifecycle.pins:
            host.lifecycle.pin(PIN_STORAGE)
            self._idle.discard(host)

    def flush_soon(self, host: ObjectHost, storage: DurableObjectStorage) -> None:
        """Commit writes made outside a turn (the storage asked for it with call_soon)."""
        if storage.has_unflushed() and not storage.in_transaction:
            task = asyncio.ensure_future(self.flush_storage(host, storage))
            host.background.add(task)
            task.add_done_callback(lambda t: self._flushed_outside_a_turn(host, t))

    def _flushed_outside_a_turn(self, host: ObjectHost, task: asyncio.Future[None]) -> None:
        host.background.discard(task)
        failed = not task.cancelled() and task.exception() is not None
        if failed and host.lifecycle.state is ObjectState.ACTIVE:
            self._reset(host, f"a storage write failed ({task.exception()})", "storage_error")

    async def flush_storage(self, host: ObjectHost, storage: DurableObjectStorage) -> None:
        """Commit the pending batch; once nothing is left in flight, open the gate."""
        batch = None
        try:
            try:
                # An object with its own database commits it in commit_database(), on a thread
                # (decision 0008); its batch holds only its alarm, for the server's database.
                batch = storage.take_pending()
                await storage.commit_database()
                change = await self.committer.commit(batch) if batch is not None else 0
            except Exception as exc:
                if batch is not None:
                    storage.failed(batch)
                self.stats.storage_errors += 1
                # The output gate breaks: what waited for these writes must never be
                # sent (the finally below would otherwise release it before the reset).
                if host.storage is storage or host.storage is None:
                    host.gate = None
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(str(exc)) from exc
            if batch is not None:
                storage.committed(batch, change)
                self._alarm_committed(batch)
            if storage.in_flight():
                await self.committer.idle()
        finally:
            self._release_gate(host, storage)

    def quota_refused(self, which: str, message: str) -> None:
        """A put() was refused by the ``object`` or the ``total`` storage quota."""
        self.stats.quota_refusals[which] += 1
        if which == "total":
            self._total_refused = True
        now = self.clock()
        if which == "total" and now >= self._quota_logged_at + QUOTA_LOG_INTERVAL:
            # The operator's quota (the application gets the exception): said once a minute.
            self._quota_logged_at = now
            log.warning("storage quota reached: %s", message)

    def storage_failure(self) -> str | None:
        """Why storage is failing (the last commit's error), or None when it works."""
        failure = self.committer.failure
        return None if failure is None else str(failure) or type(failure).__name__

    def _storage_health(self, failure: BaseException | None) -> None:
        if failure is None:
            log.warning("storage works again: a commit succeeded")
            return
        log.error(
            "storage is failing (%s); not ready until a write succeeds (a probe tries every %g s)",
            failure,
            self.storage_probe_interval,
        )
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._probe_timer is None:
            loop = asyncio.get_running_loop()
            self._probe_timer = loop.call_later(self.storage_probe_interval, self._probe_storage)

    def _probe_storage(self) -> None:
        """While commits fail, a write that leaves nothing behind tells when storage works again
        (without traffic, which a load balancer stops sending to a server that is not ready)."""
        self._probe_timer = None
        if self.committer.failure is None:
            return
        probe = [Batch(PROBE_OBJECT, writes={"probe": b"j0"}), Batch(PROBE_OBJECT, writes={"probe": None})]
        task = asyncio.ensure_future(self.committer.commit_many(probe))

        def done(t: asyncio.Future[int]) -> None:
            if t.cancelled() or t.exception() is not None:
                self._schedule_probe()

        task.add_done_callback(done)

    def _release_gate(self, host: ObjectHost, storage: DurableObjectStorage) -> None:
        if storage.busy():
            return
        if (host.storage is storage or host.storage is None) and not host.turn_hold:
            self._open_gate(host)
        if PIN_STORAGE in host.lifecycle.pins:
            self._run(host, host.lifecycle.unpin(PIN_STORAGE, self.clock()))

    def _open_gate(self, host: ObjectHost) -> None:
        held, host.gate = host.gate, None
        for entry in held or ():
            if isinstance(entry, HeldFanout):
                entry.emit(host.stats)
            else:
                link, frame = entry
                link.emit(frame)

    # -- alarms --------------------------------------------------------------------------

    def wall_ms(self) -> int:
        return int(self.wall_clock().timestamp() * 1000)

    def _alarm_committed(self, batch: Batch) -> None:
        if batch.alarm is ...:
            return
        if batch.alarm is None:
            self.alarms.remove(batch.object)
        else:
            self.alarms.set(batch.alarm)
        self._arm_alarms()

    def fire_due_alarms(self, now_ms: int | None = None) -> int:
        """Deliver every alarm due at ``now_ms`` (default: now), waking objects; return how many."""
        if now_ms is None:
            now_ms = self.wall_ms()
        fired = 0
        for due in self.alarms.pop_due(now_ms):
            row = due.row
            ns = self.namespaces.get(row.namespace)
            if ns is None:
                log.warning("alarm of %s skipped: the application has no binding %r", row.object, row.namespace)
                continue
            if self.placement is not None and not self.placement.is_local(row.id):
                continue  # its owner fires it (this process loaded it while it owned the slot)
            host = self.host(DurableObjectId(row.namespace, row.id, row.name), ns.object_class)
            self.stats.alarms += 1
            self.submit(host, AlarmEvent(self, due))
            fired += 1
        self._arm_alarms()
        return fired

    def retry_alarm(self, due: Due) -> None:
        row = due.row
        if self.alarms.get(row.object) is not None:
            return  # a new alarm was set meanwhile; it replaces this one
        retry = due.retries + 1
        if retry > MAX_RETRIES:
            self.stats.alarms_given_up += 1
            log.error("alarm of %s failed %s; giving up and deleting it", row.object, counted(retry, "time"))
            task = asyncio.ensure_future(self.committer.commit(Batch(row.object, alarm=None)))
            task.add_done_callback(_log_failure)
            return
        delay = retry_delay_ms(retry)
        self.stats.alarm_retries += 1
        log.warning("alarm of %s failed; retry %d of %d in %d ms", row.object, retry, MAX_RETRIES, delay)
        self.alarms.set(row, at_ms=self.wall_ms() + delay, retries=retry)
        self._arm_alarms()

    def _arm_alarms(self) -> None:
        if self._alarm_timer is not None:
            self._alarm_timer.cancel()
            self._alarm_timer = None
        next_at = self.alarms.next_at()
        if next_at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving yet: start() arms it
        # Re-check at least every minute, so a wall-clock jump is noticed.
        delay = min(max(next_at - self.wall_ms(), 0) / 1000, 60.0)
        self._alarm_timer = loop.call_later(delay, self.fire_due_alarms)

    # -- ctx services -------------------------------------------------------------------

    def block_concurrency_while(self, host: ObjectHost, fn: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        lc = host.lifecycle
        loop = asyncio.get_running_loop()
        if lc.state is ObjectState.WAKING:
            # Called by the constructor: the wake ends when this ends.
            task: asyncio.Future[T] = asyncio.ensure_future(_call_async(fn))
            host.blockers.add(task)
            task.add_done_callback(lambda t: self._blocker_done(host, t))
            return task
        if lc.current is not None and CURRENT_OWNER.get() is host:
            # Inside a handler: its turn already holds every other event back.
            return asyncio.ensure_future(_call_async(fn))
        # Outside any turn (a wait_until task, a callback): take a turn of its own.
        reply: asyncio.Future[T] = loop.create_future()
        self.submit(host, BlockEvent(reply, fn))
        return reply

    def _blocker_done(self, host: ObjectHost, task: asyncio.Future[Any]) -> None:
        host.blockers.discard(task)
        if host.lifecycle.state is not ObjectState.WAKING:
            return
        failed = not task.cancelled() and task.exception() is not None
        if failed:
            self._construction_failed(host, task.exception(), "block_concurrency_while() in the constructor")
        elif not host.blockers:
            self._run(host, host.lifecycle.constructed(self.clock()))

    def wait_until(self, host: ObjectHost, aw: Awaitable[Any]) -> None:
        if not inspect.isawaitable(aw):
            msg = f"wait_until() takes an awaitable, got {type(aw).__name__}"
            raise InvalidArgumentError(msg)
        task = asyncio.ensure_future(aw)
        host.background.add(task)
        if task is not aw:  # made here of the instance's coroutine, not someone else's future
            host.own_work.add(task)
        host.lifecycle.pin(PIN_WAIT_UNTIL)
        self._idle.discard(host)

        def done(t: asyncio.Future[Any]) -> None:
            host.background.discard(t)
            host.own_work.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.stats.handler_errors["wait_until"] += 1
                log.error("wait_until() work of %s %s raised", host.cls.__name__, host.id, exc_info=t.exception())
            self._run(host, host.lifecycle.unpin(PIN_WAIT_UNTIL, self.clock()))

        task.add_done_callback(done)

    def abort(self, host: ObjectHost, reason: str | None) -> None:
        why = f"abort({reason!r})" if reason is not None else "abort()"
        state = host.lifecycle.state
        if state is ObjectState.WAKING:
            # In the constructor: raising makes the wake fail, which is the reset.
            raise ObjectResetError(f"{host.cls.__name__} {host.id}: {why}")
        if state is ObjectState.ACTIVE:
            self._reset(host, why, "abort")

    def _reset(self, host: ObjectHost, why: str, kind: str) -> None:
        self.stats.evictions[kind] += 1
        log.error(
            "resetting %s %s: %s; closing its %s with 1011",
            host.cls.__name__,
            host.id,
            why,
            counted(len(host.sockets), "WebSocket"),
        )
        self._drop_instance(host, why)

    def _drop_instance(self, host: ObjectHost, why: str) -> None:
        """Reset ``host`` now (``ctx.abort()``, a failed commit, a lost slot, also while it
        wakes): its pending writes, held outputs, running turn, ``wait_until()`` coroutines,
        constructor's ``block_concurrency_while()`` work, instance and queued events go."""
        host.reset_reason = why
        current = host.lifecycle.current
        if host.storage is not None:
            host.storage.discard_pending()  # a reset loses the writes not yet committed ...
        host.gate = None  # ... and the outputs that waited for them
        host.turn_hold = False
        task = host.turn_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        host.turn_task = None
        for work in [*host.own_work, *host.blockers]:  # its wait_until() coroutines and a
            if work is not asyncio.current_task():  # waking constructor's work go with it
                work.cancel()  # (each leaves its set in its done callback)
        self._run(host, host.lifecycle.reset(self.clock()))
        if isinstance(current, CallEvent):
            # The event in hand when the object was reset (an RPC that called ctx.abort(),
            # a fetch whose commit failed, a lost slot): its caller gets the reset, not silence.
            current.dropped(f"{host.cls.__name__} {host.id} was reset: {why}")

    # -- socket events from the server glue ---------------------------------------------

    def socket_opened(
        self, link: SocketLink, transport: Transport, url: str, protocol: str | None, extensions: str
    ) -> None:
        self.stats.sockets_accepted += 1
        link.attach(transport, url, protocol, extensions)

    def handshake_failed(self, link: SocketLink) -> None:
        """The 101 never reached the peer: the socket leaves its object without events."""
        link.move(SocketInput.HANDSHAKE_FAILED)
        host = cast("ObjectHost | None", link.owner)
        if host is not None:
            self.forget_socket(host, link)

    def message_received(self, link: SocketLink, message: str | bytes) -> asyncio.Future[None] | None:
        """Queue a message; a future means "read nothing more from this socket until it resolves".

        That is the back-pressure that bounds an object's queue: a client that
        sends faster than its object handles stops being read once
        ``QUEUE_HIGH_WATER`` events are waiting, instead of growing memory.
        """
        host: ObjectHost = link.owner  # type: ignore[assignment]  # the hot path: no cast() call
        self.stats.messages_in += 1
        if host is None:
            return None  # its object moved away (drop_slots): what the peer still sends reaches nobody
        pair = host.auto_response
        if pair is not None:
            # One comparison for an object with one pair; a table look-up for several.
            if message != pair.request:
                table = host.auto_responses
                pair = None if table is None else table.get(message)
            if pair is not None:
                self._auto_respond(host, link, pair)
                return None
        event = MessageEvent(link, message)
        self.submit(host, event)
        lc = host.lifecycle
        held = self._held  # during a code reload, many held events stop the reading too
        if (held is None or len(held) < HELD_HIGH_WATER) and (len(lc.queue) < QUEUE_HIGH_WATER or lc.current is event):
            return None
        event.started = asyncio.get_running_loop().create_future()
        return event.started

    def _auto_respond(self, host: ObjectHost, link: SocketLink, pair: WebSocketRequestResponsePair) -> None:
        """Answered by the runtime: the object is neither woken nor called."""
        if link.state is not SocketState.OPEN:
            return
        link.ws.send(pair.response)
        now = link.auto_response_at = self.wall_clock()
        request = pair.request
        times = link.auto_response_times
        if times is None:
            link.auto_response_times = {request: now}
        else:
            if request not in times and len(times) >= self.limits.auto_responses:
                # The pairs were replaced: keep the times of current requests only (bounded).
                times = link.auto_response_times = {r: t for r, t in times.items() if host.answers(r)}
            times[request] = now
        self.stats.auto_responses += 1

    def peer_closed(self, link: SocketLink, code: int | None, reason: str) -> None:
        """The peer sent Close (``code`` None when the frame had no status: 1005)."""
        self._socket_event(link, SocketInput.PEER_CLOSE, code or 1005, reason if code else "", True)

    def transport_lost(self, link: SocketLink) -> None:
        self._socket_event(link, SocketInput.TRANSPORT_LOST, 1006, "", False)

    def socket_failed(self, link: SocketLink, code: int, reason: str) -> None:
        """The runtime closed the socket with ``code`` (1002, 1007, 1009) because of the peer."""
        self._socket_event(link, SocketInput.FAIL, code, reason, False)

    def _socket_event(self, link: SocketLink, what: SocketInput, code: int, reason: str, clean: bool) -> None:
        host = cast("ObjectHost | None", link.owner)
        final = link.move(what)
        if host is None or final is Final.NONE:
            return
        self.stats.count_close(code)
        if final is Final.CLOSE:
            self.submit(host, CloseEvent(link, code, reason, clean))
        else:
            self.submit(host, ErrorEvent(link, WebSocketProtocolError(code, reason)))

    # -- outbound sockets (ctx.connect_web_socket; docs/decisions/0011) ------------------

    def set_dialer(self, dialer: Dialer) -> None:
        self.dialer = dialer

    async def connect_web_socket(
        self, host: ObjectHost, link: SocketLink, url: str, protocols: tuple[str, ...], headers: dict[str, str]
    ) -> None:
        """Open ``link`` as a client WebSocket of ``host``: it joins the object at once (as a
        connecting socket, counted against the limits) and leaves without an event if the
        connection cannot be made."""
        dialer = self.dialer
        if dialer is None:
            msg = (
                "connect_web_socket(): this runtime is not served (no wsecho server or Mount opens connections for it)"
            )
            raise InvalidStateError(msg)
        limits = self.limits
        mine = host.outbound_count()
        if mine >= limits.outbound_per_object:
            msg = (
                f"connect_web_socket(): this object already has {mine} outbound WebSockets; "
                f"the limit is {limits.outbound_per_object} (--max-outbound-per-object)"
            )
            raise InvalidStateError(msg)
        if dialer.open >= limits.outbound_sockets:
            msg = (
                f"connect_web_socket(): this process already has {dialer.open} outbound WebSockets; "
                f"the limit is {limits.outbound_sockets} (--max-outbound)"
            )
            raise InvalidStateError(msg)
        if host.hibernatable_count >= limits.sockets_per_object:
            msg = (
                f"connect_web_socket(): this object already has {host.hibernatable_count} "
                f"hibernatable WebSockets; the limit is {limits.sockets_per_object}"
            )
            raise InvalidStateError(msg)
        host.add_socket(link)
        try:
            await dialer.connect(link, url, protocols, headers)
        except BaseException:
            if link.state is SocketState.CONNECTING or link.state is SocketState.CLOSE_SENT:
                self.handshake_failed(link)
            raise

    def outbound_opened(self, link: SocketLink, transport: Transport, url: str, protocol: str | None) -> None:
        """The upstream answered 101: frames go both ways from now on."""
        self.stats.outbound_opened += 1
        link.attach(transport, url, protocol, "")

    # -- carrying out effects -----------------------------------------------------------

    def _run(self, host: ObjectHost, effects: list[Effect[Event]]) -> None:
        # A worklist rather than recursion: sync handlers end their turn at once,
        # and a long queue must not grow the stack.
        if not effects:  # the common end of a turn: nothing more to do
            if host.lifecycle.state is ObjectState.HIBERNATING:
                self._maybe_forget(host)
            return
        work: deque[Effect[Event]] = deque(effects)
        while work:
            effect = work.popleft()
            kind = type(effect)
            # The two effects of every message first: they decide the throughput.
            if kind is Deliver:
                if self._guard is not None and self._lease_lost(host) is not None:
                    return  # the next queued event, after the lease ran out: the slot was dropped
                if host.wake_started is not None:
                    self.stats.wake_latency.observe(self.clock() - host.wake_started)
                    host.wake_started = None
                work.extend(self._deliver(host, effect.event))  # type: ignore[union-attr]
            elif kind is BecameIdle:
                work.extend(self._became_idle(host, effect.since))  # type: ignore[union-attr]
            elif kind is RunConstructor:
                host.wake_started = self.clock()
                self._admit(host)
                work.extend(self._construct(host))
            elif isinstance(effect, DropInstance):
                host.instance = None
                self._awake.pop(host, None)
                if host.storage is not None:
                    host.storage.close()  # an object's own database closes while it hibernates
                host.storage = None
                self._idle.discard(host)
                host.hibernate_soon = False  # an instance's wishes go with it
                if host.awake_until is not None:
                    self._stop_keeping_awake(host)
            elif isinstance(effect, CloseSockets):
                for link in list(host.sockets):
                    link.close_now(effect.code, effect.reason)
            elif isinstance(effect, DropEvents):
                self.stats.dropped_events += len(effect.events)
                log.warning(
                    "%s %s: dropped %d queued events (%s) because %s",
                    host.cls.__name__,
                    host.id,
                    len(effect.events),
                    ", ".join(e.name for e in effect.events),
                    host.reset_reason,
                )
                for event in effect.events:
                    event.dropped(f"{host.cls.__name__} {host.id} was reset: {host.reset_reason}")
        self._maybe_forget(host)

    def _became_idle(self, host: ObjectHost, since: float) -> list[Effect[Event]]:
        if host.hibernate_soon:  # ctx.hibernate_now() in the turn that just ended
            host.hibernate_soon = False
            self.stats.evictions["idle"] += 1
            return host.lifecycle.evict(since)
        if host.awake_until is not None:
            return []  # ctx.keep_awake_until(): the sweep indexes it again at that time
        if host.hibernate_after <= 0:
            # hibernate_after = 0: hibernate the moment the object is idle.
            self.stats.evictions["idle"] += 1
            return host.lifecycle.evict(since)
        self._idle.touch(host, host.hibernate_after, since)
        return []

    def _construct(self, host: ObjectHost) -> list[Effect[Event]]:
        if self._replaced:
            self._class_now(host)
        ctx = DurableObjectState(host)
        token = CURRENT_OWNER.set(host)
        try:
            host.instance = host.cls(ctx, self.env)
        except Exception as exc:  # noqa: BLE001 - a constructor's error resets only its object
            return self._construction_failed(host, exc, "its constructor raised", run=False)
        finally:
            CURRENT_OWNER.reset(token)
        if host.constructions:
            self.stats.wakes += 1
            log.info(
                "woke %s %s (%s, %s waiting)",
                host.cls.__name__,
                host.id,
                counted(len(host.sockets), "socket"),
                counted(len(host.lifecycle.queue), "event"),
            )
        host.constructions += 1
        if host.blockers:
            return []  # block_concurrency_while() work ends the wake (see _blocker_done)
        return host.lifecycle.constructed(self.clock())

    def _construction_failed(
        self, host: ObjectHost, exc: BaseException | None, why: str, run: bool = True
    ) -> list[Effect[Event]]:
        self.stats.constructor_errors += 1
        log.error(
            "%s %s could not wake: %s; closing its %s with 1011",
            host.cls.__name__,
            host.id,
            why,
            counted(len(host.sockets), "WebSocket"),
            exc_info=exc,
        )
        host.instance = None
        self._awake.pop(host, None)
        host.reset_reason = why
        for task in list(host.blockers):
            task.cancel()
        host.blockers.clear()
        effects = host.lifecycle.construct_failed(self.clock())
        if run:
            self._run(host, effects)
            return []
        return effects

    def _deliver(self, host: ObjectHost, event: Event) -> list[Effect[Event]]:
        assert host.instance is not None
        started = None
        if host.event_timeout_ms is not None and isinstance(event, SocketEvent):
            # A turn may still run over its timeout, and then nothing it sent may go out.
            started = self.clock()
            host.turn_hold = True
            if host.gate is None:
                host.gate = []
        token = CURRENT_OWNER.set(host)
        try:
            result = event.invoke(host.instance)
            if type(result) is _CoroutineType and host.cls.eager_handlers:
                # Run the handler's first step right here: most handlers finish without
                # ever suspending (an echo, a broadcast), and then no task is needed.
                try:
                    suspended_on = result.send(None)
                except StopIteration as done:
                    return self._complete(host, event, done.value, None, started)
                result = _resume(result, suspended_on, self._resume_check(host))
            elif type(result) is _CoroutineType and self._guard is not None:
                result = _started(result, self._resume_check(host))
            if inspect.isawaitable(result):
                # The task copies this context, so the handler's awaits stay "inside" the object.
                host.turn_task = task = asyncio.ensure_future(self._finish_turn(host, event, result, started))
                timeout_ms = host.event_timeout_ms
                if started is not None and timeout_ms is not None:
                    handle = asyncio.get_running_loop().call_later(
                        timeout_ms / 1000, self._event_timed_out, host, event
                    )
                    task.add_done_callback(lambda _: handle.cancel())
                return []
        except Exception as exc:  # noqa: BLE001 - a handler's error never kills the socket
            return self._complete(host, event, None, exc, started)
        finally:
            CURRENT_OWNER.reset(token)
        return self._complete(host, event, result, None, started)

    async def _finish_turn(
        self, host: ObjectHost, event: Event, pending: Awaitable[Any], started: float | None
    ) -> None:
        try:
            result = await pending
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - logged, never fatal
            effects = self._complete(host, event, None, exc, started)
        else:
            effects = self._complete(host, event, result, None, started)
        self._run(host, effects)

    def _complete(
        self, host: ObjectHost, event: Event, result: Any, exc: BaseException | None, started: float | None
    ) -> list[Effect[Event]]:
        """The handler is done: commit its writes (holding its outputs), then end the turn."""
        if host.lifecycle.current is not event:
            event.after(self, host)  # the object was reset while this ran; that was logged
            return []
        host.turn_task = None
        if started is not None and host.event_timeout_ms is not None:
            # Python cannot interrupt a handler that does not await (a sync handler, a busy
            # loop): it is measured when it returns, and what it sent is discarded.
            elapsed_ms = (self.clock() - started) * 1000
            if elapsed_ms > host.event_timeout_ms:
                event.after(self, host)
                self._reset(host, f"{event.name} ran {elapsed_ms:.0f} ms, over the event timeout", "event_timeout")
                return []
        if type(event) is AlarmEvent:
            event.before_commit(self, host, exc)  # the only event that writes at the end of its turn
        storage = host.storage
        if storage is not None and storage.busy():
            host.turn_task = asyncio.ensure_future(self._commit_turn(host, storage, event, result, exc))
            return []
        return self._finish(host, event, result, exc)

    async def _commit_turn(
        self,
        host: ObjectHost,
        storage: DurableObjectStorage,
        event: Event,
        result: Any,
        exc: BaseException | None,
    ) -> None:
        try:
            await self.flush_storage(host, storage)
        except StorageError as err:
            if host.lifecycle.current is event:
                event.failed(err)
                event.after(self, host)
                self._reset(host, f"a storage write failed ({err}); its outputs were discarded", "storage_error")
            return
        if host.lifecycle.current is not event:
            event.after(self, host)
            return
        host.turn_task = None
        self._run(host, self._finish(host, event, result, exc))

    def _finish(self, host: ObjectHost, event: Event, result: Any, exc: BaseException | None) -> list[Effect[Event]]:
        if host.turn_hold:
            host.turn_hold = False
            if host.storage is None or not host.storage.busy():
                self._open_gate(host)
        if exc is not None:
            self._handler_failed(host, event, exc)
        elif type(event) is not MessageEvent:  # a message's result goes nowhere
            event.succeeded(result)
        if type(event) is not MessageEvent:
            event.after(self, host)
        now = self.clock()
        if host.lifecycle.try_end(now):
            return self._became_idle(host, now)
        return host.lifecycle.turn_ended(now)

    def _event_timed_out(self, host: ObjectHost, event: Event) -> None:
        if host.lifecycle.current is event:
            self._reset(
                host,
                f"{event.name} ran over the event timeout of {host.event_timeout_ms} ms",
                "event_timeout",
            )

    def _handler_failed(self, host: ObjectHost, event: Event, exc: BaseException) -> None:
        self.stats.handler_errors[event.name] += 1
        if not event.failed(exc):
            log.error(
                "%s.%s raised (object %s); the object keeps serving",
                host.cls.__name__,
                event.name,
                host.id,
                exc_info=exc,
            )

    def drop_slots(self, slots: Collection[int], why: str) -> int:
        """Stop acting for every object of ``slots`` (a cluster member lost or gave up their
        leases): close their sockets with 1012 so that clients reconnect to the new owner,
        drop their instances and queued events, forget them. Returns how many objects."""
        victims = [h for h in self._hosts.values() if slot_of(h.id.hex) in slots]
        closed = 0
        for host in victims:
            for link in list(host.sockets):
                if link.state in (SocketState.OPEN, SocketState.CLOSE_RECEIVED, SocketState.CONNECTING):
                    link.close_now(1012, "Service Restart: the object moved; reconnect")
                    closed += 1
                link.owner = None  # the peer's answer reaches no object any more
                host.remove_socket(link)
            self.stats.evictions["lease"] += 1
            if host.lifecycle.state is not ObjectState.HIBERNATING:
                self._drop_instance(host, why)
            if self._hosts.get(host.id) is host:
                del self._hosts[host.id]
        if victims:
            log.warning(
                "stopped serving %s of %s (%s): closed %s with 1012",
                counted(len(victims), "object"),
                counted(len(slots), "slot"),
                why,
                counted(closed, "WebSocket"),
            )
        return len(victims)

    async def load_alarms(self, slots: Collection[int]) -> int:
        """Schedule the stored alarms of ``slots`` (a cluster member just took their leases)."""
        rows = [row for row in await self.backend.stored_alarms() if slot_of(row.id) in slots]
        for row in rows:
            self.alarms.set(row)
        self._arm_alarms()
        return len(rows)

    def forget_socket(self, host: ObjectHost, link: SocketLink) -> None:
        if host.remove_socket(link) and not link.hibernatable:
            self._run(host, host.lifecycle.unpin(PIN_NON_HIBERNATABLE, self.clock()))
        self._maybe_forget(host)

    def _maybe_forget(self, host: ObjectHost) -> None:
        # A hibernating object with no sockets and nothing queued is only a name:
        # drop its host so memory does not grow with every object ever used.
        lc = host.lifecycle
        forgettable = lc.state is ObjectState.HIBERNATING and not host.sockets and not lc.queue and not lc.pins
        if forgettable and self._hosts.get(host.id) is host:
            del self._hosts[host.id]


async def _call_async(fn: Callable[[], Awaitable[T]]) -> T:
    result = fn()
    if inspect.isawaitable(result):
        return await result
    return result  # a sync fn is allowed too


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a storage write outside any object failed", exc_info=task.exception())


_CoroutineType = types.CoroutineType


@types.coroutine
def _resume(
    coro: Coroutine[Any, Any, T], suspended_on: Any, check: Callable[[], str | None] | None = None
) -> Generator[Any, Any, T]:
    """Continue, inside a task, a coroutine whose first step already ran and yielded ``suspended_on``.

    The task drives this generator exactly as it would drive the coroutine: what the
    coroutine yields goes up to the task, what the task sends or throws goes down.

    ``check`` (a cluster member's lease, see :meth:`Runtime._lease_lost`) is asked before every
    step: a message means the object may no longer act here, and the coroutine gets
    ``ObjectResetError`` with it at the await it is suspended in, instead of what it waited for. A
    process paused past its lease resumes a handler only to unwind it.
    """
    while True:
        try:
            value = yield suspended_on
        except BaseException as exc:  # noqa: BLE001 - cancellation and errors go to the coroutine
            try:
                suspended_on = coro.throw(exc)
            except StopIteration as done:
                return cast(T, done.value)
        else:
            why = None if check is None else check()
            try:
                suspended_on = coro.send(value) if why is None else coro.throw(ObjectResetError(why))
            except StopIteration as done:
                return cast(T, done.value)


@types.coroutine
def _started(coro: Coroutine[Any, Any, T], check: Callable[[], str | None] | None) -> Generator[Any, Any, T]:
    """Run ``coro`` from its first step inside the task (a class without ``eager_handlers``),
    then as :func:`_resume` does."""
    try:
        suspended_on = coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    return (yield from _resume(coro, suspended_on, check))


async def _nothing() -> None:
    """The empty turn of :meth:`Runtime.barrier`."""
