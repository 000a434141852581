"""What the runtime keeps per object: the events in its queue and its :class:`ObjectHost`.

An :class:`ObjectHost` outlives its object's instance (it holds the lifecycle, the sockets and
their tags, the auto-response, the event timeout, the output gate) and is the runtime's side
of the object for the api: ``ctx`` (an ``ObjectPort``), the sockets (``SocketOwner``) and
``ctx.storage`` (``StoragePort``) reach the runtime only through it. Events and hosts reach the
runtime through :class:`Services`, which :class:`~wsecho.runtime.runtime.Runtime` implements.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import attrs

from wsecho.api.http import Request, Response
from wsecho.api.ids import DurableObjectId
from wsecho.api.sql import SqlObjectStorage
from wsecho.api.storage import DurableObjectStorage
from wsecho.api.websocket import CURRENT_OWNER, SocketLink
from wsecho.backends.base import Backend
from wsecho.backends.objectdb import ObjectDatabases
from wsecho.core.alarms import AlarmSchedule, Due
from wsecho.core.errors import (
    InvalidArgumentError,
    InvalidStateError,
    ObjectResetError,
    WebSocketProtocolError,
)
from wsecho.core.fanout import FanoutPolicy, policy_for
from wsecho.core.lifecycle import (
    ObjectLifecycle,
    SocketState,
)
from wsecho.core.limits import Limits
from wsecho.core.stats import Stats
from wsecho.runtime.commits import GroupCommitter

if TYPE_CHECKING:
    from wsecho.api.objects import DurableObject
    from wsecho.api.websocket import Held, WebSocketRequestResponsePair


T = TypeVar("T")

#: Handler names that stubs do not expose as RPC methods.
NOT_RPC = frozenset({"fetch", "alarm", "web_socket_message", "web_socket_close", "web_socket_error", "ctx", "env"})

PIN_WAIT_UNTIL = "wait_until() work is pending"
PIN_STORAGE = "storage writes are being committed"
PIN_NON_HIBERNATABLE = "a non-hibernatable WebSocket is open"


# -- events: what sits in an object's queue ----------------------------------------


class Services(Protocol):
    """What events and hosts need from the runtime (:class:`~wsecho.runtime.runtime.Runtime`)."""

    stats: Stats
    limits: Limits
    alarms: AlarmSchedule
    backend: Backend
    committer: GroupCommitter
    #: Where objects of SQL-storage classes keep their databases (None: nowhere, no such class).
    databases: ObjectDatabases | None

    def forget_socket(self, host: ObjectHost, link: SocketLink) -> None: ...

    def retry_alarm(self, due: Due) -> None: ...

    def block_concurrency_while(self, host: ObjectHost, fn: Callable[[], Awaitable[T]]) -> asyncio.Future[T]: ...

    def wait_until(self, host: ObjectHost, aw: Awaitable[Any]) -> None: ...

    def abort(self, host: ObjectHost, reason: str | None) -> None: ...

    def hibernate_soon(self, host: ObjectHost) -> None: ...

    def keep_awake_until(self, host: ObjectHost, at_ms: int | None) -> None: ...

    async def connect_web_socket(
        self, host: ObjectHost, link: SocketLink, url: str, protocols: tuple[str, ...], headers: dict[str, str]
    ) -> None: ...

    def batch_started(self, host: ObjectHost) -> None: ...

    def flush_soon(self, host: ObjectHost, storage: DurableObjectStorage) -> None: ...

    async def flush_storage(self, host: ObjectHost, storage: DurableObjectStorage) -> None: ...

    def quota_refused(self, which: str, message: str) -> None: ...


class Hooks:
    """What the runtime calls around an event's handler; by default, nothing."""

    __slots__ = ()

    def succeeded(self, result: Any) -> None:
        pass

    def failed(self, exc: BaseException) -> bool:
        """Whether the exception reached someone (a caller); if not, the runtime logs it."""
        return False

    def before_commit(self, runtime: Services, host: ObjectHost, exc: BaseException | None) -> None:
        pass

    def after(self, runtime: Services, host: ObjectHost) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


@attrs.define(eq=False)
class CallEvent(Hooks):
    """An event whose caller waits for its result (HTTP, RPC, block_concurrency_while)."""

    reply: asyncio.Future[Any]

    def succeeded(self, result: Any) -> None:
        if not self.reply.done():
            self.reply.set_result(result)

    def failed(self, exc: BaseException) -> bool:
        """The caller gets the exception, so the runtime need not log it."""
        if not self.reply.done():
            self.reply.set_exception(exc)
        return True

    def dropped(self, reason: str) -> None:
        self.failed(ObjectResetError(reason))


@attrs.define(eq=False)
class HttpEvent(CallEvent):
    request: Request
    name = "fetch"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "fetch", None)
        if handler is None:
            msg = f"{type(instance).__name__} has no fetch() handler"
            raise InvalidStateError(msg)
        return handler(self.request)

    def succeeded(self, result: Any) -> None:
        if isinstance(result, Response):
            super().succeeded(result)
        else:
            msg = f"fetch() must return a wsecho.Response, got {type(result).__name__}"
            self.failed(TypeError(msg))


@attrs.define(eq=False)
class RpcEvent(CallEvent):
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.method

    def invoke(self, instance: DurableObject) -> Any:
        target = getattr(instance, self.method, None)
        if self.method.startswith("_") or self.method in NOT_RPC or not callable(target):
            msg = f"{type(instance).__name__} has no RPC method {self.method!r}"
            raise InvalidArgumentError(msg)
        return target(*self.args, **self.kwargs)


@attrs.define(eq=False)
class BlockEvent(CallEvent):
    """``block_concurrency_while(fn)`` from outside a turn: ``fn`` runs as a turn of its own."""

    fn: Callable[[], Any]
    name = "block_concurrency_while"

    def invoke(self, instance: DurableObject) -> Any:
        return self.fn()


@attrs.define(eq=False)
class SocketEvent(Hooks):
    """A socket event: its handler's errors are logged, nobody waits for its result."""

    link: SocketLink
    name = "socket event"


@attrs.define(eq=False)
class MessageEvent(SocketEvent):
    message: str | bytes
    #: Set when the queue was long: the socket reads no further frame until this resolves.
    started: asyncio.Future[None] | None = None
    name = "web_socket_message"

    def invoke(self, instance: DurableObject) -> Any:
        self._release()
        handler = getattr(instance, "web_socket_message", None)
        return None if handler is None else handler(self.link.ws, self.message)

    def dropped(self, reason: str) -> None:
        self._release()

    def _release(self) -> None:
        if self.started is not None and not self.started.done():
            self.started.set_result(None)


@attrs.define(eq=False)
class FinalEvent(SocketEvent):
    """The last event of a socket: once delivered, the socket leaves its object."""

    def after(self, runtime: Services, host: ObjectHost) -> None:
        runtime.forget_socket(host, self.link)

    def dropped(self, reason: str) -> None:
        host = cast("ObjectHost | None", self.link.owner)
        if host is not None:
            host.runtime.forget_socket(host, self.link)


@attrs.define(eq=False)
class CloseEvent(FinalEvent):
    code: int
    reason: str
    was_clean: bool
    name = "web_socket_close"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "web_socket_close", None)
        return None if handler is None else handler(self.link.ws, self.code, self.reason, self.was_clean)

    def after(self, runtime: Services, host: ObjectHost) -> None:
        # SPEC §5: if the handler did not answer the peer's Close, the runtime does,
        # with the same code (none for 1005), so no client is left hanging.
        if self.link.state is SocketState.CLOSE_RECEIVED:
            self.link.close_now(None if self.code == 1005 else self.code, "")
        super().after(runtime, host)


@attrs.define(eq=False)
class ErrorEvent(FinalEvent):
    error: WebSocketProtocolError
    name = "web_socket_error"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "web_socket_error", None)
        return None if handler is None else handler(self.link.ws, self.error)


@attrs.frozen
class AlarmInfo:
    """What ``alarm(info)`` receives (Cloudflare's alarmInfo); ``alarm()`` may also take nothing."""

    retry_count: int
    is_retry: bool


@attrs.define(eq=False)
class AlarmEvent(Hooks):
    runtime: Services
    due: Due
    error: BaseException | None = None
    name = "alarm"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "alarm", None)
        if handler is None:
            msg = f"{type(instance).__name__} set an alarm but has no alarm() handler"
            raise InvalidStateError(msg)
        if inspect.signature(handler).parameters:
            return handler(AlarmInfo(self.due.retries, self.due.retries > 0))
        return handler()

    def before_commit(self, runtime: Services, host: ObjectHost, exc: BaseException | None) -> None:
        # The alarm is spent: delete it in the same commit as the handler's writes,
        # unless the handler (or an event before it) set a new one.
        if exc is None and runtime.alarms.get(self.due.row.object) is None:
            host.open_storage().clear_spent_alarm()

    def failed(self, exc: BaseException) -> bool:
        self.error = exc
        return False

    def after(self, runtime: Services, host: ObjectHost) -> None:
        if self.error is not None:
            runtime.retry_alarm(self.due)

    def dropped(self, reason: str) -> None:
        self.runtime.retry_alarm(self.due)


Event = HttpEvent | RpcEvent | BlockEvent | MessageEvent | CloseEvent | ErrorEvent | AlarmEvent


@attrs.define(eq=False, repr=False)
class ObjectHost:
    """Everything about one object that survives hibernation.

    It is the runtime's side of the object for the api: ``ctx`` (an
    :class:`~wsecho.api.objects.ObjectPort`), its sockets (a
    :class:`~wsecho.api.websocket.SocketOwner`) and ``ctx.storage`` (a
    :class:`~wsecho.api.storage.StoragePort`) reach the runtime only through it.
    """

    id: DurableObjectId
    cls: type[DurableObject]
    runtime: Services
    hibernate_after: float
    lifecycle: ObjectLifecycle[Event] = attrs.field(factory=ObjectLifecycle)
    #: Accepted sockets in acceptance order (a dict used as an ordered set).
    sockets: dict[SocketLink, None] = attrs.field(factory=dict)
    #: Hibernatable sockets by tag, each in acceptance order.
    tagged: dict[str, dict[SocketLink, None]] = attrs.field(factory=dict)
    hibernatable_count: int = 0
    #: The first (or only) auto-response pair: the one the hot path compares first ...
    auto_response: WebSocketRequestResponsePair | None = None
    #: ... and every pair by its request, when there are two or more (else None).
    auto_responses: dict[str | bytes, WebSocketRequestResponsePair] | None = None
    event_timeout_ms: int | None = None
    instance: DurableObject | None = None
    #: How many times the constructor ran (the first creation included).
    constructions: int = 0
    #: The task driving an async handler, so it is not garbage-collected mid-turn.
    turn_task: asyncio.Future[Any] | None = None
    #: block_concurrency_while() work started by the constructor; the wake ends with it.
    blockers: set[asyncio.Future[Any]] = attrs.field(factory=set)
    #: wait_until() work and commits outside a turn, kept referenced until done.
    background: set[asyncio.Future[Any]] = attrs.field(factory=set)
    #: The tasks wait_until() made of the instance's coroutines: they go with the instance.
    own_work: set[asyncio.Future[Any]] = attrs.field(factory=set)
    #: Why the object was last reset, for the log line about dropped events.
    reset_reason: str = ""
    #: ``ctx.storage`` of the current instance (its cache goes when the object hibernates).
    storage: DurableObjectStorage | None = None
    #: When the current wake began (the clock's time), until its first event starts.
    wake_started: float | None = None
    #: ``ctx.hibernate_now()`` in a turn: hibernate the moment the object is next idle ...
    hibernate_soon: bool = False
    #: ... or ``ctx.keep_awake_until()``: not before this time (the runtime's clock), else None.
    #: Each cancels the other, and a hibernation or a reset cancels both.
    awake_until: float | None = None
    #: The output gate: frames held back until the object's writes are durable, or None.
    gate: list[Held] | None = None
    #: The gate also waits for the current turn to end (it has an event timeout to keep).
    turn_hold: bool = False
    #: The runtime's counts and limits (plain attributes: sockets read them on every send).
    stats: Stats = attrs.field(init=False)
    limits: Limits = attrs.field(init=False)
    #: The class's slow-consumer policy for ``ctx.broadcast`` (with the server's default limit).
    fanout_policy: FanoutPolicy = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.stats = self.runtime.stats
        self.limits = self.runtime.limits
        self.take_class(self.cls, self.hibernate_after)

    def __repr__(self) -> str:
        return f"<ObjectHost {self.cls.__name__} {self.id!r} {self.lifecycle.state.value}>"

    def take_class(self, cls: type[DurableObject], hibernate_after: float) -> None:
        """Serve the next instance from ``cls`` (a code reload; the object has no instance)."""
        self.cls = cls
        self.hibernate_after = hibernate_after
        self.fanout_policy = policy_for(
            cls.__name__, cls.fanout_overflow, cls.fanout_queue_bytes, self.limits.fanout_queue_bytes
        )

    @property
    def attachment_version(self) -> int:
        return self.cls.attachment_version

    def upgrade_attachment(self, value: Any, from_version: int) -> Any:
        return self.cls.upgrade_attachment(value, from_version)

    def add_socket(self, link: SocketLink) -> None:
        link.owner = self
        self.sockets[link] = None
        if link.hibernatable:
            self.hibernatable_count += 1
            self._index(link, link.tags)

    def remove_socket(self, link: SocketLink) -> bool:
        """Forget ``link``; True if it was a socket of this object."""
        if link not in self.sockets:
            return False
        del self.sockets[link]
        if link.hibernatable:
            self.hibernatable_count -= 1
            self._unindex(link, link.tags)
        return True

    def retag(self, link: SocketLink, tags: tuple[str, ...]) -> None:
        """Give ``link`` (a hibernatable socket of this object) ``tags`` instead of its own,
        in the index too; a tag it keeps keeps its place in that tag's order."""
        old = link.tags
        self._unindex(link, tuple(t for t in old if t not in tags))
        self._index(link, tuple(t for t in tags if t not in old))
        link.tags = tags

    def tag_counts(self, limit: int) -> dict[str, int]:
        """Sockets per tag for the ``limit`` tags with the most, most first (from the index)."""
        tagged = self.tagged
        return {tag: len(tagged[tag]) for tag in heapq.nlargest(limit, tagged, key=lambda t: len(tagged[t]))}

    def auto_response_pairs(self) -> list[WebSocketRequestResponsePair]:
        if self.auto_responses is not None:
            return list(self.auto_responses.values())
        return [] if self.auto_response is None else [self.auto_response]

    def set_auto_responses(self, pairs: list[WebSocketRequestResponsePair]) -> None:
        """The object's pairs (checked already): the first one apart, the table if several."""
        self.auto_response = pairs[0] if pairs else None
        self.auto_responses = {p.request: p for p in pairs} if len(pairs) > 1 else None

    def answers(self, request: str | bytes) -> bool:
        """Whether one of the current pairs has this request."""
        table = self.auto_responses
        if table is not None:
            return request in table
        pair = self.auto_response
        return pair is not None and type(pair.request) is type(request) and pair.request == request

    def _index(self, link: SocketLink, tags: tuple[str, ...]) -> None:
        for tag in tags:
            self.tagged.setdefault(tag, {})[link] = None

    def _unindex(self, link: SocketLink, tags: tuple[str, ...]) -> None:
        for tag in tags:
            members = self.tagged[tag]
            del members[link]
            if not members:
                del self.tagged[tag]

    # -- for ctx and sockets (ObjectPort, SocketOwner) ----------------------------------

    def busy(self) -> bool:
        """Busy in the lifecycle's sense, or running ``wait_until`` work."""
        return self.lifecycle.busy() or bool(self.background)

    def accept_non_hibernatable(self, link: SocketLink) -> None:
        link.hibernatable = False
        self.add_socket(link)
        self.lifecycle.pin(PIN_NON_HIBERNATABLE)

    def open_storage(self) -> DurableObjectStorage:
        if self.storage is None:
            self.storage = SqlObjectStorage(self) if self.cls.storage == "sql" else DurableObjectStorage(self)
        return self.storage

    def block_concurrency_while(self, fn: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        return self.runtime.block_concurrency_while(self, fn)

    def wait_until(self, aw: Awaitable[Any]) -> None:
        self.runtime.wait_until(self, aw)

    def abort(self, reason: str | None) -> None:
        self.runtime.abort(self, reason)

    def hibernate_now(self) -> None:
        self.runtime.hibernate_soon(self)

    def keep_awake_until(self, at_ms: int | None) -> None:
        self.runtime.keep_awake_until(self, at_ms)

    async def connect_web_socket(
        self, link: SocketLink, url: str, protocols: tuple[str, ...], headers: dict[str, str]
    ) -> None:
        await self.runtime.connect_web_socket(self, link, url, protocols, headers)

    def outbound_count(self) -> int:
        """How many of this object's sockets it opened itself (connect_web_socket)."""
        return sum(1 for link in self.sockets if link.outbound)

    # -- for ctx.storage (StoragePort) ----------------------------------------------------

    def batch_started(self) -> None:
        self.runtime.batch_started(self)

    def in_own_turn(self) -> bool:
        return self.lifecycle.current is not None and CURRENT_OWNER.get() is self

    def flush_soon(self, storage: DurableObjectStorage) -> None:
        asyncio.get_running_loop().call_soon(self.runtime.flush_soon, self, storage)

    async def flush(self, storage: DurableObjectStorage) -> None:
        await self.runtime.flush_storage(self, storage)

    async def read(self, obj: str, keys: list[str]) -> dict[str, bytes]:
        return await self.runtime.backend.read(obj, keys)

    async def scan(
        self, obj: str, start: str | None, end: str | None, limit: int | None, reverse: bool
    ) -> list[tuple[str, bytes]]:
        return await self.runtime.backend.scan(obj, start, end, limit, reverse)

    async def usage(self, obj: str) -> int:
        return await self.runtime.backend.usage(obj)

    def stored_bytes(self) -> int:
        return self.runtime.committer.stored_bytes

    def alarm_at(self, obj: str) -> int | None:
        return self.runtime.alarms.get(obj)

    def quota_refused(self, which: str, message: str) -> None:
        self.runtime.quota_refused(which, message)

    # -- for ctx.storage of a SQL-storage class (DatabasePort) ------------------------------

    def _databases(self) -> ObjectDatabases:
        databases = self.runtime.databases
        assert databases is not None, "the runtime refuses SQL-storage classes where there is no place for them"
        return databases

    def open_database(self) -> sqlite3.Connection:
        return self._databases().open(self.id.namespace, self.id.hex)

    def close_database(self, conn: sqlite3.Connection) -> None:
        self._databases().close(self.id.namespace, self.id.hex, conn)

    def remove_database(self, conn: sqlite3.Connection) -> None:
        self._databases().remove(self.id.namespace, self.id.hex, conn)

    async def run_database(self, fn: Callable[[], T]) -> T:
        return await self._databases().run(fn)
