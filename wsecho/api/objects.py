"""What application code touches about objects: ids, namespaces, stubs, ``ctx`` and the base class.

Every call that needs to find or wake an object goes through a :class:`Router` (the
runtime, handed in), and ``ctx`` reaches its object through an :class:`ObjectPort` (the
runtime's host of the object): the api never imports the runtime. Nothing here keeps a
module-level registry, so one process can run several runtimes (and placement can later
move behind the namespace without changing this API).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from wsecho.api.codec import utf8
from wsecho.api.http import Request
from wsecho.api.ids import DurableObjectId
from wsecho.api.storage import epoch_ms
from wsecho.api.websocket import (
    SOCKET_STATES,
    HeldFanout,
    ReadyState,
    SocketLink,
    SocketOwner,
    WebSocket,
    WebSocketRequestResponsePair,
    checked_message,
    fan_out,
    link_of,
)
from wsecho.core.errors import InvalidArgumentError, InvalidStateError
from wsecho.core.fanout import Fanout, FanoutPolicy
from wsecho.core.lifecycle import SocketState

if TYPE_CHECKING:
    from wsecho.api.http import Response
    from wsecho.api.storage import DurableObjectStorage
    from wsecho.core.limits import Limits

T = TypeVar("T")

_HEX_ID = re.compile(r"[0-9a-f]{64}")


class Router(Protocol):
    """How a namespace's stubs reach objects (the runtime implements it)."""

    async def fetch_object(self, cls: type[DurableObject], id: DurableObjectId, request: Request) -> Response: ...  # noqa: A002

    async def call_object(
        self,
        cls: type[DurableObject],
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any: ...


class ObjectPort(SocketOwner, Protocol):
    """What ``ctx`` needs from its object's host (the runtime implements it)."""

    id: DurableObjectId
    hibernatable_count: int
    #: Accepted sockets in acceptance order, and the hibernatable ones by tag.
    sockets: dict[SocketLink, None]
    tagged: dict[str, dict[SocketLink, None]]
    auto_response: WebSocketRequestResponsePair | None
    event_timeout_ms: int | None
    #: The class's slow-consumer policy for ``ctx.broadcast``.
    fanout_policy: FanoutPolicy

    def open_storage(self) -> DurableObjectStorage: ...

    def add_socket(self, link: SocketLink) -> None: ...

    def retag(self, link: SocketLink, tags: tuple[str, ...]) -> None: ...

    def auto_response_pairs(self) -> list[WebSocketRequestResponsePair]: ...

    def set_auto_responses(self, pairs: list[WebSocketRequestResponsePair]) -> None: ...

    def block_concurrency_while(self, fn: Callable[[], Awaitable[T]]) -> asyncio.Future[T]: ...

    def wait_until(self, aw: Awaitable[Any]) -> None: ...

    def abort(self, reason: str | None) -> None: ...

    def hibernate_now(self) -> None: ...

    def keep_awake_until(self, at_ms: int | None) -> None: ...

    async def connect_web_socket(
        self, link: SocketLink, url: str, protocols: tuple[str, ...], headers: dict[str, str]
    ) -> None:
        """Open ``link`` (tags set, not yet a socket of the object) as a client WebSocket to ``url``."""
        ...


class DurableObjectNamespace:
    """A binding (``env.NAME``): turns names and strings into ids, ids into stubs."""

    __slots__ = ("_cls", "_router", "name")

    def __init__(self, name: str, cls: type[DurableObject], router: Router) -> None:
        self.name = name
        self._cls = cls
        self._router = router

    def __repr__(self) -> str:
        return f"<DurableObjectNamespace {self.name} of {self._cls.__name__}>"

    @property
    def object_class(self) -> type[DurableObject]:
        """The class bound to this namespace."""
        return self._cls

    def bind_class(self, cls: type[DurableObject]) -> None:
        """Bind the class a code reload imported (the runtime's; stubs follow at once)."""
        self._cls = cls

    def id_from_name(self, name: str) -> DurableObjectId:
        """The same name always gives the same id (in this namespace)."""
        if not isinstance(name, str):
            msg = f"id_from_name() takes a str, not {type(name).__name__}"
            raise InvalidArgumentError(msg)
        digest = hashlib.sha256(utf8(f"{self.name}\0{name}", "id_from_name(): the name")).hexdigest()
        return DurableObjectId(self.name, digest, name)

    def new_unique_id(self) -> DurableObjectId:
        return DurableObjectId(self.name, secrets.token_hex(32))

    def id_from_string(self, value: str) -> DurableObjectId:
        if not isinstance(value, str) or not _HEX_ID.fullmatch(value):
            msg = f"id_from_string() takes 64 lowercase hex digits, got {value!r}"
            raise InvalidArgumentError(msg)
        return DurableObjectId(self.name, value)

    def get(self, id: DurableObjectId) -> DurableObjectStub:  # noqa: A002 - Cloudflare's name
        if not isinstance(id, DurableObjectId) or id.namespace != self.name:
            msg = f"get() takes an id made by env.{self.name}, got {id!r}"
            raise InvalidArgumentError(msg)
        return DurableObjectStub(self, id)

    def get_by_name(self, name: str) -> DurableObjectStub:
        return self.get(self.id_from_name(name))


class DurableObjectStub:
    """A handle on one object; calls are delivered in the object's turn."""

    __slots__ = ("_namespace", "id")

    def __init__(self, namespace: DurableObjectNamespace, id: DurableObjectId) -> None:  # noqa: A002
        self._namespace = namespace
        self.id = id

    @property
    def name(self) -> str | None:
        return self.id.name

    def __repr__(self) -> str:
        return f"<DurableObjectStub {self.id!r}>"

    async def fetch(self, request: Request | str, **init: Any) -> Response:
        """Deliver ``request`` (or a URL string) to the object's ``fetch`` handler."""
        if isinstance(request, str):
            request = Request(request, **init)
        elif not isinstance(request, Request):
            msg = f"fetch() takes a Request or a URL string, not {type(request).__name__}"
            raise InvalidArgumentError(msg)
        ns = self._namespace
        return await ns._router.fetch_object(ns._cls, self.id, request)

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        """``await stub.method(*args, **kwargs)``: an RPC call delivered in the object's turn.

        Arguments and results are passed as they are (same process), not copied.
        """
        if method.startswith("_"):
            raise AttributeError(method)
        ns = self._namespace
        stub_id = self.id

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await ns._router.call_object(ns._cls, stub_id, method, args, kwargs)

        call.__name__ = method
        return call


class Env:
    """The ``env`` argument: one attribute per binding, read-only."""

    __slots__ = ("_bindings",)
    _bindings: dict[str, Any]

    def __init__(self, bindings: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_bindings", dict(bindings))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._bindings[name]
        except KeyError:
            msg = f"env has no binding {name!r}"
            raise AttributeError(msg) from None

    def __setattr__(self, name: str, value: Any) -> None:
        msg = "env is read-only"
        raise AttributeError(msg)

    def __dir__(self) -> list[str]:
        return sorted(self._bindings)


class DurableObjectState:
    """``ctx``: the runtime's side of one object, handed to its constructor.

    A new one is made for every instance, so nothing stored on it survives a
    hibernation; what does survive (the sockets, their tags and attachments,
    the auto-response, the event timeout) lives in the object's host.
    """

    __slots__ = ("_host",)

    def __init__(self, host: ObjectPort) -> None:
        self._host = host

    @property
    def id(self) -> DurableObjectId:
        return self._host.id

    @property
    def storage(self) -> DurableObjectStorage:
        """This object's durable key-value storage and alarm (see wsecho.api.storage)."""
        return self._host.open_storage()

    # -- sockets --------------------------------------------------------------------

    def accept_web_socket(self, ws: WebSocket, tags: Iterable[str] = ()) -> None:
        """Make ``ws`` (the server end of a pair) a hibernatable socket of this object.

        ``tags`` (at most 10 distinct, each at most 256 UTF-8 bytes; duplicates are
        dropped, order kept) select it later in ``get_web_sockets(tag)``. Every check
        runs before the socket is accepted, so a violation leaves nothing behind.
        """
        host = self._host
        limits = host.limits
        link = link_of(ws)
        link.require_acceptable("accept_web_socket")
        clean = _validate_tags(tags, limits)
        if host.hibernatable_count >= limits.sockets_per_object:
            msg = (
                f"accept_web_socket(): this object already has {host.hibernatable_count} "
                f"hibernatable WebSockets; the limit is {limits.sockets_per_object}"
            )
            raise InvalidStateError(msg)
        link.tags = clean
        link.hibernatable = True
        host.add_socket(link)

    async def connect_web_socket(
        self,
        url: str,
        *,
        tags: Iterable[str] = (),
        protocols: Iterable[str] = (),
        headers: Mapping[str, str] | None = None,
    ) -> WebSocket:
        """Open a client WebSocket to ``url`` (``ws://`` or ``wss://``) held by the runtime: it
        is a hibernatable socket of this object like an accepted one (tags, attachment,
        ``get_web_sockets``, ``send``, ``close``, auto-responses). A message on it wakes the
        object and goes to ``web_socket_message``; the upstream's Close to ``web_socket_close``.

        Raises ``ValueError`` for a bad ``url``, ``InvalidStateError`` over a limit
        (``--max-outbound-per-object``, ``--max-outbound``), and ``OutboundConnectError``
        (``.status``: the upstream's answer when it was not 101) when it cannot connect.
        """
        host = self._host
        clean_url = _outbound_url(url)
        clean = _validate_tags(tags, host.limits, "connect_web_socket")
        offered = _protocols(protocols)
        extra = _headers(headers)
        link = link_of(WebSocket())
        link.tags = clean
        link.hibernatable = True
        link.outbound = True
        await host.connect_web_socket(link, clean_url, offered, extra)
        return link.ws

    def get_web_sockets(self, tag: str | None = None, state: ReadyState | None = None) -> list[WebSocket]:
        """The hibernatable sockets (with ``tag``, if given; in ``state``, if given) whose final
        event is not delivered yet, in acceptance order."""
        members = self._members(tag, "get_web_sockets")
        if state is None:
            if tag is None:
                return [link.ws for link in members if link.hibernatable]
            return [link.ws for link in members]
        states = _socket_states(state, "get_web_sockets")
        return [link.ws for link in members if link.hibernatable and link.state in states]

    def count_web_sockets(self, tag: str | None = None, state: ReadyState | None = None) -> int:
        """How many sockets ``get_web_sockets(tag, state)`` would list, from the index: without
        a ``state``, no socket is looked at at all."""
        members = self._members(tag, "count_web_sockets")
        if state is None:
            return self._host.hibernatable_count if tag is None else len(members)
        states = _socket_states(state, "count_web_sockets")
        return sum(1 for link in members if link.hibernatable and link.state in states)

    def _members(self, tag: str | None, what: str) -> Collection[SocketLink]:
        """Every socket of the object (``tag`` None: non-hibernatable ones too), or those with ``tag``."""
        host = self._host
        if tag is None:
            return host.sockets
        if isinstance(tag, str):
            return host.tagged.get(tag, _NOBODY)
        msg = f"{what}(): tag must be a str or None, got {tag!r}"
        raise InvalidArgumentError(msg)

    def get_tags(self, ws: WebSocket) -> list[str]:
        return list(self._own(ws, "get_tags").tags)

    def set_tags(self, ws: WebSocket, tags: Iterable[str]) -> None:
        """Give ``ws`` these ``tags`` instead of its own (the limits of ``accept_web_socket``);
        ``get_web_sockets(tag)``, ``count_web_sockets(tag)`` and ``broadcast(tag=...)`` see the
        change at once, and it survives hibernation. A violation changes nothing."""
        link = self._tagged_link(ws, "set_tags")
        self._host.retag(link, _validate_tags(tags, self._host.limits, "set_tags"))

    def add_tag(self, ws: WebSocket, tag: str) -> None:
        """Add ``tag`` to the tags of ``ws`` (at the end); a tag it has already is left where it is."""
        link = self._tagged_link(ws, "add_tag")
        if isinstance(tag, str) and tag in link.tags:
            return
        self._host.retag(link, _validate_tags((*link.tags, _one_tag(tag, "add_tag")), self._host.limits, "add_tag"))

    def remove_tag(self, ws: WebSocket, tag: str) -> bool:
        """Take ``tag`` off ``ws``; False if it did not have it."""
        link = self._tagged_link(ws, "remove_tag")
        tag = _one_tag(tag, "remove_tag")
        if tag not in link.tags:
            return False
        self._host.retag(link, tuple(t for t in link.tags if t != tag))
        return True

    def broadcast(self, message: str | bytes, tag: str | None = None, exclude: Iterable[WebSocket] = ()) -> int:
        """Send ``message`` (text for ``str``, binary for bytes) to every open socket of this
        object, or to the hibernatable sockets with ``tag``, except those in ``exclude``; return
        how many sockets it reached.

        The frame is built once for all of them (and compressed once per window size), and
        goes out like ``ws.send()`` would: in order with the other messages to each socket,
        behind the output gate while this object's writes commit, and to a socket still
        joining once its handshake is done. Hibernated sockets are included; no socket object
        is built and nothing is woken. A socket whose send queue is over the class's
        ``fanout_queue_bytes`` misses the message or is closed with 1008 (``fanout_overflow``).
        """
        message = checked_message(message, "broadcast()")
        host = self._host
        members = self._members(tag, "broadcast")
        skip = _excluded(exclude)
        targets: list[SocketLink] = []
        joining = 0
        for link in members:
            state = link.state
            if state is _OPEN:
                if link not in skip:
                    targets.append(link)
            elif state is _CONNECTING and link not in skip:
                # Like ws.send(): it goes out first thing once the handshake is done.
                if link.early is None:
                    link.early = []
                link.early.append(message)
                joining += 1
        stats = host.stats
        stats.broadcasts += 1
        fanout = Fanout(message, host.fanout_policy)
        gate = host.gate
        if gate is not None:
            gate.append(HeldFanout(targets, fanout))  # sent once the object's writes are durable
            return len(targets) + joining
        return fan_out(targets, fanout, stats) + joining

    # -- auto-response ----------------------------------------------------------------

    def set_web_socket_auto_response(self, pair: WebSocketRequestResponsePair | None = None) -> None:
        """Answer a message equal to ``pair.request`` with ``pair.response``, without
        waking the object or calling a handler; ``None`` removes it. It replaces every pair
        ``set_web_socket_auto_responses`` set."""
        what = "set_web_socket_auto_response"
        if pair is not None and not isinstance(pair, WebSocketRequestResponsePair):
            msg = f"{what}() takes a WebSocketRequestResponsePair or None, not {type(pair).__name__}"
            raise InvalidArgumentError(msg)
        self._host.set_auto_responses(_checked_pairs([] if pair is None else [pair], self._host.limits, what))

    def set_web_socket_auto_responses(self, pairs: Iterable[WebSocketRequestResponsePair]) -> None:
        """Several pairs at once (each request different; text or binary): each message equal
        to one of the requests is answered with its response without waking the object. They
        replace the object's pairs; an empty list removes them."""
        what = "set_web_socket_auto_responses"
        if isinstance(pairs, WebSocketRequestResponsePair):
            msg = f"{what}() takes a list of pairs, not one pair (write [pair])"
            raise InvalidArgumentError(msg)
        self._host.set_auto_responses(_checked_pairs(list(pairs), self._host.limits, what))

    def get_web_socket_auto_response(self) -> WebSocketRequestResponsePair | None:
        """The pair (the first one, when ``set_web_socket_auto_responses`` set several), or None."""
        return self._host.auto_response

    def get_web_socket_auto_responses(self) -> list[WebSocketRequestResponsePair]:
        """Every pair, in the order they were set."""
        return self._host.auto_response_pairs()

    def get_web_socket_auto_response_timestamp(
        self, ws: WebSocket, request: str | bytes | None = None
    ) -> datetime | None:
        """When the runtime last answered ``ws`` with an auto-response (UTC), or None; with
        ``request``, when it last answered that request on ``ws``."""
        link = self._own(ws, "get_web_socket_auto_response_timestamp")
        if request is None:
            return link.auto_response_at
        times = link.auto_response_times
        return None if times is None else times.get(request)

    # -- object control ----------------------------------------------------------------

    def set_hibernatable_web_socket_event_timeout(self, ms: int | None = None) -> None:
        """Reset the object (sockets closed with 1011) when a WebSocket handler runs longer
        than ``ms`` milliseconds; ``None`` turns the timeout off."""
        if ms is not None:
            limit = self._host.limits.event_timeout_ms
            if not isinstance(ms, int) or isinstance(ms, bool) or not 1 <= ms <= limit:
                msg = (
                    "set_hibernatable_web_socket_event_timeout(): ms must be an integer from 1 "
                    f"to {limit} (or None), got {ms!r}"
                )
                raise InvalidArgumentError(msg)
        self._host.event_timeout_ms = ms

    def get_hibernatable_web_socket_event_timeout(self) -> int | None:
        return self._host.event_timeout_ms

    def block_concurrency_while(self, fn: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Run ``fn()`` while no other event is delivered to this object.

        In the constructor it holds back every event until ``fn`` finishes (if it
        raises, the object is reset as if the constructor had raised). In a handler,
        events are already held back: ``await`` it like ``fn()`` itself.
        """
        return self._host.block_concurrency_while(fn)

    def wait_until(self, aw: Awaitable[Any]) -> None:
        """Keep the object in memory until ``aw`` is done; its errors are logged."""
        self._host.wait_until(aw)

    def abort(self, reason: str | None = None) -> None:
        """Reset the object now: every socket closes with 1011, the instance and its
        queued events are dropped. In the constructor it raises ``ObjectResetError``."""
        self._host.abort(reason)

    def hibernate_now(self) -> None:
        """Hibernate this object as soon as it is idle, without waiting for its
        ``hibernate_after``: when the current handler returns (and its writes are committed,
        its ``wait_until`` work done), or at once when called outside any event. Its sockets
        stay open; the next event builds a new instance. Cancels ``keep_awake_until``."""
        self._host.hibernate_now()

    def keep_awake_until(self, when: datetime | float | None) -> None:
        """Do not hibernate this object for being idle before ``when`` (an aware datetime or
        epoch milliseconds, like ``set_alarm``); from then on its ``hibernate_after`` applies
        again. ``None`` (or a time already past) cancels it; so does ``hibernate_now()``."""
        self._host.keep_awake_until(None if when is None else epoch_ms(when, "keep_awake_until"))

    def _own(self, ws: WebSocket, what: str) -> SocketLink:
        if not isinstance(ws, WebSocket):
            msg = f"{what}(): takes a WebSocket, got {ws!r}"
            raise InvalidArgumentError(msg)
        link = link_of(ws)
        if link.owner is not self._host or not link.hibernatable:
            msg = f"{what}(): the WebSocket is not a hibernatable socket of this object"
            raise InvalidStateError(msg)
        return link

    def _tagged_link(self, ws: WebSocket, what: str) -> SocketLink:
        """A socket whose tags may change: one of this object's that is still in its index."""
        link = self._own(ws, what)
        if link not in self._host.sockets:
            msg = f"{what}(): the WebSocket's final event was delivered already; it has left this object"
            raise InvalidStateError(msg)
        return link


_OPEN = SocketState.OPEN
_CONNECTING = SocketState.CONNECTING
_NOBODY: frozenset[SocketLink] = frozenset()


def _socket_states(state: ReadyState, what: str) -> frozenset[SocketState]:
    try:
        return SOCKET_STATES[ReadyState(state)]
    except (ValueError, TypeError):
        msg = f"{what}(): state must be a ReadyState (0 to 3) or None, got {state!r}"
        raise InvalidArgumentError(msg) from None


def _excluded(exclude: Iterable[WebSocket]) -> frozenset[SocketLink] | set[SocketLink]:
    if not exclude:
        return _NOBODY
    if isinstance(exclude, WebSocket):
        msg = "broadcast(): exclude takes a list of WebSockets, not one WebSocket (write exclude=[ws])"
        raise InvalidArgumentError(msg)
    skip = set()
    for ws in exclude:
        if not isinstance(ws, WebSocket):
            msg = f"broadcast(): exclude takes WebSockets, got {ws!r}"
            raise InvalidArgumentError(msg)
        skip.add(link_of(ws))
    return skip


def _validate_tags(tags: Iterable[str], limits: Limits, what: str = "accept_web_socket") -> tuple[str, ...]:
    """``tags`` checked against the limits for ``what()``, duplicates dropped, order kept."""
    if isinstance(tags, str):
        msg = f"{what}(): tags must be a list of str, not the str {tags!r}"
        raise InvalidArgumentError(msg)
    clean: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str):
            msg = f"{what}(): every tag must be a str, got {tag!r}"
            raise InvalidArgumentError(msg)
        size = len(utf8(tag, f"{what}(): a tag"))
        if size > limits.tag_bytes:
            msg = f"{what}(): tag {tag[:40]!r}… is {size} UTF-8 bytes; the limit is {limits.tag_bytes}"
            raise InvalidArgumentError(msg)
        clean[tag] = None
    if len(clean) > limits.tags_per_socket:
        msg = f"{what}(): {len(clean)} distinct tags; the limit is {limits.tags_per_socket}"
        raise InvalidArgumentError(msg)
    return tuple(clean)


def _checked_pairs(
    pairs: list[WebSocketRequestResponsePair], limits: Limits, what: str
) -> list[WebSocketRequestResponsePair]:
    if len(pairs) > limits.auto_responses:
        msg = f"{what}(): {len(pairs)} pairs; the limit is {limits.auto_responses}"
        raise InvalidArgumentError(msg)
    seen: set[str | bytes] = set()
    limit = limits.auto_response_bytes
    for pair in pairs:
        if not isinstance(pair, WebSocketRequestResponsePair):
            msg = f"{what}() takes WebSocketRequestResponsePairs, got {pair!r}"
            raise InvalidArgumentError(msg)
        for name, message in (("request", pair.request), ("response", pair.response)):
            size = len(message) if isinstance(message, bytes) else len(utf8(message, f"{what}(): the {name}"))
            if size > limit:
                unit = "bytes" if isinstance(message, bytes) else "UTF-8 bytes"
                msg = f"{what}(): the {name} is {size} {unit}; the limit is {limit}"
                raise InvalidArgumentError(msg)
        if pair.request in seen:
            msg = f"{what}(): two pairs have the request {pair.request!r}; each request needs one response"
            raise InvalidArgumentError(msg)
        seen.add(pair.request)
    return pairs


def _outbound_url(url: object) -> str:
    """``url`` if it is a ws:// or wss:// URL with a host (else ValueError naming it)."""
    if not isinstance(url, str):
        msg = f"connect_web_socket(): the url must be a str, got {url!r}"
        raise InvalidArgumentError(msg)
    why = None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        why = str(exc)
    else:
        if parts.scheme not in ("ws", "wss"):
            why = "the scheme must be ws or wss"
        elif not parts.hostname:
            why = "it has no host"
        elif parts.fragment:
            why = "a WebSocket URL has no fragment (RFC 6455 §3)"
    if why is not None:
        msg = f"connect_web_socket(): bad url {url!r}: {why}"
        raise InvalidArgumentError(msg)
    return url


def _protocols(protocols: Iterable[str]) -> tuple[str, ...]:
    if isinstance(protocols, str):
        msg = f"connect_web_socket(): protocols must be a list of str, not the str {protocols!r}"
        raise InvalidArgumentError(msg)
    offered = tuple(protocols)
    for name in offered:
        if not isinstance(name, str) or not name or not _TOKEN.fullmatch(name):
            msg = f"connect_web_socket(): every protocol must be an HTTP token, got {name!r}"
            raise InvalidArgumentError(msg)
    return offered


def _headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    extra = dict(headers or {})
    for name, value in extra.items():
        if (
            not isinstance(name, str)
            or not _TOKEN.fullmatch(name)
            or not isinstance(value, str)
            or "\n" in value
            or "\r" in value
        ):
            msg = f"connect_web_socket(): bad header {name!r}: {value!r}"
            raise InvalidArgumentError(msg)
    return extra


#: An HTTP token (RFC 9110 §5.6.2): a header name, a subprotocol.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _one_tag(tag: str, what: str) -> str:
    if not isinstance(tag, str):
        msg = f"{what}(): the tag must be a str, got {tag!r}"
        raise InvalidArgumentError(msg)
    return tag


class DurableObject:
    """Base class of application objects.

    Subclasses may define, each sync or async: ``fetch(request)``,
    ``web_socket_message(ws, message)``, ``web_socket_close(ws, code, reason,
    was_clean)``, ``web_socket_error(ws, error)``.
    A class attribute ``hibernate_after`` (seconds) overrides the server's setting;
    ``0`` hibernates the object the moment it is idle (every event wakes it).
    ``eager_handlers = False`` runs every async handler in a task of its own.
    ``fanout_overflow`` and ``fanout_queue_bytes`` are the slow-consumer policy of
    ``ctx.broadcast``. ``storage = "sql"`` gives each object its own SQLite database.
    ``attachment_version`` and ``upgrade_attachment`` carry socket attachments across a
    code reload (docs/api.md, "Attachments across versions").
    """

    hibernate_after: ClassVar[float | None] = None
    #: What ``ctx.broadcast`` does to a socket whose send queue is over ``fanout_queue_bytes``:
    #: ``"close"`` it with 1008 (the client can reconnect and catch up) or ``"drop"`` the
    #: message for it (it misses messages while it lags: game ticks, dashboards).
    fanout_overflow: ClassVar[str] = "close"
    #: That per-socket limit in bytes (at least 64 KiB); None: the server's --max-fanout-queue.
    fanout_queue_bytes: ClassVar[int | None] = None
    #: Run an async handler's first step at once, without a task (most handlers never
    #: suspend, and a task per event is costly). Until its first suspending ``await`` it
    #: runs where the event came from (a socket callback, or the caller's task), so
    #: ``asyncio.current_task()`` is not its own; set this to False in a class whose
    #: handlers need their own task from the first line (``asyncio.timeout()``).
    eager_handlers: ClassVar[bool] = True
    #: ``"sql"``: each object has its own SQLite database (``ctx.storage.sql``, and the
    #: key-value API in the same database); ``"kv"``: the key-value API only.
    storage: ClassVar[str] = "kv"
    #: Stored with every attachment this class writes; raise it when the attachment's shape
    #: changes, and ``upgrade_attachment`` is called for those an older version wrote.
    attachment_version: ClassVar[int] = 0

    def __init__(self, ctx: DurableObjectState, env: Env) -> None:
        self.ctx = ctx
        self.env = env

    @classmethod
    def upgrade_attachment(cls, value: Any, from_version: int) -> Any:
        """An attachment written at ``from_version`` (lower than ``attachment_version``), as
        this version reads it. Called by ``ws.deserialize_attachment()`` once per socket; the
        result is stored back. The default delivers the old value as it is."""
        return value
