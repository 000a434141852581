"""The runtime: finds, wakes, feeds and hibernates objects. Knows nothing of Tornado.

Each object has an :class:`ObjectHost` that outlives its instance: it holds the
object's :class:`~wsecho.lifecycle.ObjectLifecycle`, its sockets and the
instance while there is one. Every event (an HTTP request through a stub, a
message, a close, an error) enters through :meth:`Runtime.submit`; the
lifecycle answers with effects, which :meth:`Runtime._run` carries out. The
clock is injected, so tests can drive ``sweep(now=...)`` without sleeping.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from wsecho.errors import InvalidStateError, ObjectResetError, WebSocketProtocolError
from wsecho.http import Request, Response
from wsecho.idle import IdleIndex
from wsecho.lifecycle import (
    BecameIdle,
    CloseSockets,
    Deliver,
    DropEvents,
    DropInstance,
    Effect,
    Final,
    ObjectLifecycle,
    ObjectState,
    RunConstructor,
    SocketInput,
    SocketState,
)
from wsecho.objects import DurableObjectId, DurableObjectNamespace, DurableObjectState, Env

if TYPE_CHECKING:
    from wsecho.app import App
    from wsecho.objects import DurableObject
    from wsecho.websocket import Transport, WebSocket

log = logging.getLogger("wsecho")

#: Queued events per object beyond which a socket that adds one stops being read.
QUEUE_HIGH_WATER = 100


# -- events: what sits in an object's queue ----------------------------------------


@attrs.define(eq=False)
class HttpEvent:
    request: Request
    reply: asyncio.Future[Response]
    name = "fetch"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "fetch", None)
        if handler is None:
            msg = f"{type(instance).__name__} has no fetch() handler"
            raise InvalidStateError(msg)
        return handler(self.request)

    def succeeded(self, result: Any) -> None:
        if self.reply.done():
            return
        if isinstance(result, Response):
            self.reply.set_result(result)
        else:
            msg = f"fetch() must return a wsecho.Response, got {type(result).__name__}"
            self.reply.set_exception(TypeError(msg))

    def failed(self, exc: BaseException) -> bool:
        """The caller gets the exception, so the runtime need not log it."""
        if not self.reply.done():
            self.reply.set_exception(exc)
        return True

    def after(self, runtime: Runtime, host: ObjectHost) -> None:
        pass

    def dropped(self, reason: str) -> None:
        self.failed(ObjectResetError(reason))


@attrs.define(eq=False)
class _SocketEvent:
    """A socket event: its handler's errors are logged, nobody waits for its result."""

    ws: WebSocket

    def succeeded(self, result: Any) -> None:
        pass

    def failed(self, exc: BaseException) -> bool:
        return False

    def after(self, runtime: Runtime, host: ObjectHost) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


@attrs.define(eq=False)
class MessageEvent(_SocketEvent):
    message: str | bytes
    #: Set when the queue was long: the socket reads no further frame until this resolves.
    started: asyncio.Future[None] | None = None
    name = "web_socket_message"

    def invoke(self, instance: DurableObject) -> Any:
        self._release()
        handler = getattr(instance, "web_socket_message", None)
        return None if handler is None else handler(self.ws, self.message)

    def dropped(self, reason: str) -> None:
        self._release()

    def _release(self) -> None:
        if self.started is not None and not self.started.done():
            self.started.set_result(None)


@attrs.define(eq=False)
class _FinalEvent(_SocketEvent):
    """The last event of a socket: once delivered, the socket leaves its object."""

    def after(self, runtime: Runtime, host: ObjectHost) -> None:
        runtime._forget_socket(host, self.ws)

    def dropped(self, reason: str) -> None:
        host = self.ws._host
        if host is not None:
            host.runtime._forget_socket(host, self.ws)


@attrs.define(eq=False)
class CloseEvent(_FinalEvent):
    code: int
    reason: str
    was_clean: bool
    name = "web_socket_close"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "web_socket_close", None)
        return None if handler is None else handler(self.ws, self.code, self.reason, self.was_clean)

    def after(self, runtime: Runtime, host: ObjectHost) -> None:
        # SPEC §5: if the handler did not answer the peer's Close, the runtime does,
        # with the same code (none for 1005), so no client is left hanging.
        if self.ws._state is SocketState.CLOSE_RECEIVED:
            self.ws._close_unchecked(None if self.code == 1005 else self.code, "")
        super().after(runtime, host)


@attrs.define(eq=False)
class ErrorEvent(_FinalEvent):
    error: WebSocketProtocolError
    name = "web_socket_error"

    def invoke(self, instance: DurableObject) -> Any:
        handler = getattr(instance, "web_socket_error", None)
        return None if handler is None else handler(self.ws, self.error)


Event = HttpEvent | MessageEvent | CloseEvent | ErrorEvent


@attrs.define(eq=False, repr=False)
class ObjectHost:
    """Everything about one object that survives hibernation."""

    id: DurableObjectId
    cls: type[DurableObject]
    runtime: Runtime
    hibernate_after: float
    lifecycle: ObjectLifecycle[Event] = attrs.field(factory=ObjectLifecycle)
    #: Accepted sockets in acceptance order (a dict used as an ordered set).
    sockets: dict[WebSocket, None] = attrs.field(factory=dict)
    instance: DurableObject | None = None
    #: How many times the constructor ran (the first creation included).
    constructions: int = 0
    #: The task driving an async handler, so it is not garbage-collected mid-turn.
    turn_task: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<ObjectHost {self.cls.__name__} {self.id!r} {self.lifecycle.state.value}>"


class Runtime:
    """All objects of one application in one process."""

    def __init__(
        self,
        app: App,
        *,
        clock: Callable[[], float],
        hibernate_after: float = 10.0,
    ) -> None:
        self.app = app
        self.clock = clock
        self.hibernate_after = hibernate_after
        self.namespaces = {
            name: DurableObjectNamespace(name, cls, self) for name, cls in app.bindings.items()
        }
        self.env = Env({**app.vars, **self.namespaces})
        self._hosts: dict[DurableObjectId, ObjectHost] = {}
        self._idle: IdleIndex[ObjectHost] = IdleIndex()
        #: Counts of what happened: wakes, evictions, handler errors, dropped events.
        self.counters: Counter[str] = Counter()

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
        namespace: str,
        cls: type[DurableObject],
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        request: Request,
    ) -> Response:
        host = self.host(id, cls)
        reply: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.submit(host, HttpEvent(request, reply))
        return await reply

    def host(self, id: DurableObjectId, cls: type[DurableObject]) -> ObjectHost:  # noqa: A002
        """The host of object ``id``, created (hibernating, no instance) on first use."""
        host = self._hosts.get(id)
        if host is None:
            after = cls.hibernate_after if cls.hibernate_after is not None else self.hibernate_after
            host = self._hosts[id] = ObjectHost(id, cls, self, float(after))
        return host

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
            for ws in list(host.sockets):
                if ws._state in (SocketState.OPEN, SocketState.CLOSE_RECEIVED, SocketState.CONNECTING):
                    ws._close_unchecked(code, reason)

    def submit(self, host: ObjectHost, event: Event) -> None:
        """Hand ``event`` to its object: wake it if needed, deliver in arrival order."""
        self._run(host, host.lifecycle.event_arrived(event, self.clock()))

    def sweep(self, now: float | None = None) -> int:
        """Hibernate every object idle for its ``hibernate_after`` at ``now``; return how many."""
        if now is None:
            now = self.clock()
        evicted = 0
        for host in self._idle.pop_due(now):
            # An object that is busy again is re-indexed when it next becomes idle.
            if host.lifecycle.hibernation_blocker() is not None:
                continue
            self._run(host, host.lifecycle.evict(now))
            evicted += 1
        if evicted:
            self.counters["evictions"] += evicted
            log.info("hibernated %d idle objects (%d remain in memory)", evicted, len(self._idle))
        return evicted

    # -- socket events from the server glue ---------------------------------------------

    def socket_opened(
        self, ws: WebSocket, transport: Transport, url: str, protocol: str | None, extensions: str
    ) -> None:
        ws.url = url
        ws._attach(transport, protocol, extensions)

    def handshake_failed(self, ws: WebSocket) -> None:
        """The 101 never reached the peer: the socket leaves its object without events."""
        ws._move(SocketInput.HANDSHAKE_FAILED)
        if ws._host is not None:
            self._forget_socket(ws._host, ws)

    def message_received(self, ws: WebSocket, message: str | bytes) -> asyncio.Future[None] | None:
        """Queue a message; a future means "read nothing more from this socket until it resolves".

        That is the back-pressure that bounds an object's queue: a client that
        sends faster than its object handles stops being read once
        ``QUEUE_HIGH_WATER`` events are waiting, instead of growing memory.
        """
        host = ws._host
        assert host is not None
        event = MessageEvent(ws, message)
        self.submit(host, event)
        lc = host.lifecycle
        if len(lc.queue) < QUEUE_HIGH_WATER or lc.current is event:
            return None
        event.started = asyncio.get_running_loop().create_future()
        return event.started

    def peer_closed(self, ws: WebSocket, code: int | None, reason: str) -> None:
        """The peer sent Close (``code`` None when the frame had no status: 1005)."""
        self._socket_event(ws, SocketInput.PEER_CLOSE, code or 1005, reason if code else "", True)

    def transport_lost(self, ws: WebSocket) -> None:
        self._socket_event(ws, SocketInput.TRANSPORT_LOST, 1006, "", False)

    def socket_failed(self, ws: WebSocket, code: int, reason: str) -> None:
        """The runtime closed the socket with ``code`` (1002, 1007, 1009) because of the peer."""
        self._socket_event(ws, SocketInput.FAIL, code, reason, False)

    def _socket_event(self, ws: WebSocket, what: SocketInput, code: int, reason: str, clean: bool) -> None:
        host = ws._host
        final = ws._move(what)
        if host is None or final is Final.NONE:
            return
        if final is Final.CLOSE:
            self.submit(host, CloseEvent(ws, code, reason, clean))
        else:
            self.submit(host, ErrorEvent(ws, WebSocketProtocolError(code, reason)))

    # -- carrying out effects -----------------------------------------------------------

    def _run(self, host: ObjectHost, effects: Iterable[Effect[Event]]) -> None:
        # A worklist rather than recursion: sync handlers end their turn at once,
        # and a long queue must not grow the stack.
        work: deque[Effect[Event]] = deque(effects)
        while work:
            effect = work.popleft()
            if isinstance(effect, Deliver):
                work.extend(self._deliver(host, effect.event))
            elif isinstance(effect, RunConstructor):
                work.extend(self._construct(host))
            elif isinstance(effect, BecameIdle):
                self._idle.touch(host, host.hibernate_after, effect.since)
            elif isinstance(effect, DropInstance):
                host.instance = None
                self._idle.discard(host)
            elif isinstance(effect, CloseSockets):
                for ws in list(host.sockets):
                    ws._close_unchecked(effect.code, effect.reason)
            elif isinstance(effect, DropEvents):
                self.counters["dropped_events"] += len(effect.events)
                log.warning(
                    "object %s: dropped %d queued events (%s) because its constructor raised",
                    host.id,
                    len(effect.events),
                    ", ".join(e.name for e in effect.events),
                )
                for event in effect.events:
                    event.dropped("the object's constructor raised")
        self._maybe_forget(host)

    def _construct(self, host: ObjectHost) -> list[Effect[Event]]:
        ctx = DurableObjectState(host, self)
        try:
            host.instance = host.cls(ctx, self.env)
        except Exception:
            self.counters["constructor_errors"] += 1
            log.exception(
                "constructor of %s raised for object %s; closing its %d WebSockets with 1011",
                host.cls.__name__,
                host.id,
                len(host.sockets),
            )
            return host.lifecycle.construct_failed(self.clock())
        if host.constructions:
            self.counters["wakes"] += 1
            log.debug(
                "woke %s %s (%d sockets, %d events waiting)",
                host.cls.__name__,
                host.id,
                len(host.sockets),
                len(host.lifecycle.queue),
            )
        host.constructions += 1
        return host.lifecycle.constructed(self.clock())

    def _deliver(self, host: ObjectHost, event: Event) -> list[Effect[Event]]:
        assert host.instance is not None
        try:
            result = event.invoke(host.instance)
            if inspect.isawaitable(result):
                host.turn_task = asyncio.ensure_future(self._finish_turn(host, event, result))
                return []
        except Exception as exc:  # noqa: BLE001 - a handler's error never kills the socket
            self._handler_failed(host, event, exc)
        else:
            event.succeeded(result)
        return self._end_turn(host, event)

    async def _finish_turn(self, host: ObjectHost, event: Event, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - logged, never fatal
            self._handler_failed(host, event, exc)
        else:
            event.succeeded(result)
        host.turn_task = None
        self._run(host, self._end_turn(host, event))

    def _end_turn(self, host: ObjectHost, event: Event) -> list[Effect[Event]]:
        event.after(self, host)
        return host.lifecycle.turn_ended(self.clock())

    def _handler_failed(self, host: ObjectHost, event: Event, exc: BaseException) -> None:
        self.counters["handler_errors"] += 1
        if not event.failed(exc):
            log.error(
                "%s.%s raised (object %s); the object keeps serving",
                host.cls.__name__,
                event.name,
                host.id,
                exc_info=exc,
            )

    def _forget_socket(self, host: ObjectHost, ws: WebSocket) -> None:
        host.sockets.pop(ws, None)
        self._maybe_forget(host)

    def _maybe_forget(self, host: ObjectHost) -> None:
        # A hibernating object with no sockets and nothing queued is only a name:
        # drop its host so memory does not grow with every object ever used.
        lc = host.lifecycle
        forgettable = lc.state is ObjectState.HIBERNATING and not host.sockets and not lc.queue
        if forgettable and self._hosts.get(host.id) is host:
            del self._hosts[host.id]
