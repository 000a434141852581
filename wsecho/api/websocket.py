"""The application's view of a WebSocket: ``WebSocket``, ``WebSocketPair`` and ``ReadyState``.

A server-side :class:`WebSocket` belongs to the object that accepted it, not to
the object's instance, so it outlives hibernation with its state (including
"the server already closed this socket"). Frames go out through a
:class:`Transport` that the server glue attaches once the handshake is done.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from wsecho.api import attachment
from wsecho.api.codec import utf8
from wsecho.core.errors import InvalidArgumentError, InvalidStateError
from wsecho.core.lifecycle import Final, SocketInput, SocketState, socket_transition
from wsecho.core.limits import Limits

if TYPE_CHECKING:
    from wsecho.core.fanout import Fanout
    from wsecho.core.stats import Stats

#: RFC 6455 §5.5: a control frame payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON_BYTES = 123
#: Codes an endpoint may not put in a Close frame (RFC 6455 §7.4.1).
UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})


class ReadyState(enum.IntEnum):
    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


_OPEN = SocketState.OPEN
#: The socket states each ready state stands for (``get_web_sockets(state=...)`` filters by them).
SOCKET_STATES: dict[ReadyState, frozenset[SocketState]] = {
    ReadyState.CONNECTING: frozenset({SocketState.CONNECTING}),
    ReadyState.OPEN: frozenset({SocketState.OPEN}),
    ReadyState.CLOSING: frozenset({SocketState.CLOSE_RECEIVED, SocketState.CLOSE_SENT}),
    ReadyState.CLOSED: frozenset({SocketState.CLOSED, SocketState.LOST}),
}
_READY_STATE = {
    SocketState.CONNECTING: ReadyState.CONNECTING,
    SocketState.OPEN: ReadyState.OPEN,
    SocketState.CLOSE_RECEIVED: ReadyState.CLOSING,
    SocketState.CLOSE_SENT: ReadyState.CLOSING,
    SocketState.CLOSED: ReadyState.CLOSED,
    SocketState.LOST: ReadyState.CLOSED,
}


@attrs.frozen
class CloseFrame:
    """A Close held in an output gate."""

    code: int | None
    reason: str


class Transport(Protocol):
    """What the server glue provides to carry one socket's frames."""

    def send_message(self, message: str | bytes) -> None: ...

    def send_close(self, code: int | None, reason: str) -> None: ...

    def send_fanout(self, fanout: Fanout) -> bool:
        """Write a broadcast's frame (built once for every socket); False when the connection is
        gone, or when its queue was over ``fanout.policy.queue_bytes`` and the policy dropped the
        message or cut the connection (counted in ``fanout_dropped`` or ``fanout_closed``)."""
        ...


class HeldFanout:
    """A broadcast held in an output gate: the open sockets it was for, and its message."""

    __slots__ = ("fanout", "links")

    def __init__(self, links: list[SocketLink], fanout: Fanout) -> None:
        self.links = links
        self.fanout = fanout

    def emit(self, stats: Stats) -> None:
        fan_out(self.links, self.fanout, stats)


#: What an output gate holds: a frame for one socket, or a broadcast.
Held = tuple["SocketLink", "str | bytes | CloseFrame"] | HeldFanout


def fan_out(links: list[SocketLink], fanout: Fanout, stats: Stats) -> int:
    """Write ``fanout`` to each of ``links`` that is still open; how many it reached (a socket
    over its queue limit is dropped or cut, and counted, by its transport)."""
    reached = 0
    for link in links:
        if link.state is _OPEN and link.transport.send_fanout(fanout):  # type: ignore[union-attr]  # open: attached
            reached += 1
    stats.messages_out += reached
    return reached


def checked_message(message: object, what: str) -> str | bytes:
    """``message`` as ``send()`` takes it: str or bytes (a bytearray or memoryview is copied),
    text that encodes as UTF-8 (a lone surrogate fails here, not when it is sent)."""
    if isinstance(message, bytearray | memoryview):
        return bytes(message)
    if isinstance(message, str):
        if not message.isascii():  # isascii() reads a flag: free
            utf8(message, f"{what}: the message")
        return message
    if isinstance(message, bytes):
        return message
    msg = f"{what} takes str or bytes, not {type(message).__name__}"
    raise InvalidArgumentError(msg)


def validate_close(code: int | None, reason: str) -> None:
    """Raise unless ``close(code, reason)`` is something an endpoint may send (SPEC §4)."""
    if code is None:
        if reason:
            msg = f"close(): a reason needs a code, got reason {reason!r} without one"
            raise InvalidArgumentError(msg)
        return
    if not isinstance(code, int) or isinstance(code, bool):
        msg = f"close(): the code must be an integer, got {code!r}"
        raise InvalidArgumentError(msg)
    if not (1000 <= code <= 4999) or code in UNSENDABLE_CLOSE_CODES:
        msg = f"close(): code {code} may not be sent; allowed are 1000-4999 except 1004, 1005, 1006 and 1015"
        raise InvalidArgumentError(msg)
    if not isinstance(reason, str):
        msg = f"close(): the reason must be a str, got {type(reason).__name__}"
        raise InvalidArgumentError(msg)
    size = len(utf8(reason, "close(): the reason"))
    if size > MAX_CLOSE_REASON_BYTES:
        msg = f"close(): the reason is {size} UTF-8 bytes; the limit is {MAX_CLOSE_REASON_BYTES}"
        raise InvalidArgumentError(msg)


class SocketOwner(Protocol):
    """What a socket needs from the object that accepted it (the runtime's host of the object).

    Handed down by ``ctx.accept_web_socket``; the api never imports the runtime."""

    #: The output gate: frames held back until the object's writes are durable, or None.
    gate: list[Held] | None
    stats: Stats
    limits: Limits

    def accept_non_hibernatable(self, link: SocketLink) -> None:
        """``ws.accept()`` in this object's handler: the socket joins it and pins it in memory."""
        ...

    @property
    def attachment_version(self) -> int:
        """The ``attachment_version`` of the object's class (stored with each attachment)."""
        ...

    def upgrade_attachment(self, value: Any, from_version: int) -> Any:
        """The class's ``upgrade_attachment`` hook: ``value``, written at ``from_version``, as
        the current code reads it."""
        ...


#: The object whose handler (or constructor) runs in this context; the runtime sets it.
CURRENT_OWNER: ContextVar[SocketOwner | None] = ContextVar("wsecho_current_owner", default=None)


@attrs.define(eq=False, repr=False)
class SocketLink:
    """The runtime's side of one WebSocket: its state in the socket table, its owner, where
    its frames go, and what survives hibernation (tags, attachment, auto-response time).

    Handlers hold the :class:`WebSocket`; the runtime and the server glue hold this (one
    per WebSocket, from :func:`link_of`). The closing state lives only here, as
    :class:`~wsecho.core.lifecycle.SocketState`, moved by the socket table.
    """

    ws: WebSocket
    state: SocketState = SocketState.CONNECTING
    #: The other end of the pair (the client end for the server end, and back).
    peer: WebSocket | None = None
    #: The object that accepted this (server) end; set by ``accept_web_socket`` or ``accept``.
    owner: SocketOwner | None = None
    hibernatable: bool = False
    #: A client WebSocket this object opened (``ctx.connect_web_socket``), not one it accepted.
    outbound: bool = False
    transport: Transport | None = None
    #: Frames sent before the handshake finished, and a Close if one was asked for.
    early: list[str | bytes] | None = None
    early_close: tuple[int | None, str] | None = None
    tags: tuple[str, ...] = ()
    #: The attachment as compact JSON text (see wsecho.api.attachment), or None ...
    attachment: str | None = None
    #: ... and the ``attachment_version`` of the class that wrote it (0: none declared).
    attachment_version: int = 0
    #: When the runtime last answered this socket with an auto-response (any pair) ...
    auto_response_at: datetime | None = None
    #: ... and with each request's (at most ``Limits.auto_responses`` requests are kept).
    auto_response_times: dict[str | bytes, datetime] | None = None

    def move(self, what: SocketInput) -> Final:
        """Apply one input of the socket table; return the final event it calls for."""
        self.state, final = socket_transition(self.state, what)
        return final

    def emit(self, frame: str | bytes | CloseFrame) -> None:
        """Send a frame an output gate held back."""
        if self.transport is None:
            return
        if isinstance(frame, CloseFrame):
            self.transport.send_close(frame.code, frame.reason)
        else:
            self.transport.send_message(frame)

    def close_now(self, code: int | None, reason: str) -> None:
        """Send Close (checked already, or the runtime's own), behind the gate if it is shut."""
        before = self.state
        self.move(SocketInput.APP_CLOSE)
        if before is SocketState.OPEN or before is SocketState.CLOSE_RECEIVED:
            gate = self.owner.gate if self.owner is not None else None
            if gate is not None:
                gate.append((self, CloseFrame(code, reason)))
            else:
                assert self.transport is not None
                self.transport.send_close(code, reason)
        elif before is SocketState.CONNECTING:
            self.early_close = (code, reason)

    def attach(self, transport: Transport, url: str, protocol: str | None, extensions: str) -> None:
        """The handshake finished: frames now go out through ``transport``."""
        self.transport = transport
        ws = self.ws
        ws.url = url
        ws.protocol = protocol
        ws.extensions = extensions
        self.move(SocketInput.HANDSHAKE_DONE)
        early, self.early = self.early, None
        for message in early or ():
            transport.send_message(message)
        if self.early_close is not None:
            code, reason = self.early_close
            self.early_close = None
            transport.send_close(code, reason)

    def require_acceptable(self, what: str) -> None:
        """Raise unless this is the server end of a new pair that nothing accepted yet."""
        if self.owner is not None:
            msg = f"{what}(): this WebSocket was already accepted"
            raise InvalidStateError(msg)
        if self.peer is None or self.state is not SocketState.CONNECTING:
            msg = f"{what}() takes the server end of a new WebSocketPair"
            raise InvalidStateError(msg)

    def require_server_end(self, what: str) -> None:
        if self.owner is None:
            msg = (
                f"{what}() on a WebSocket that no object accepted: call "
                "ctx.accept_web_socket(server) first (the client end only goes into "
                "Response(status=101, web_socket=client))"
            )
            raise InvalidStateError(msg)


class WebSocket:
    """One end of a WebSocket connection, as handlers see it."""

    __slots__ = ("_link", "extensions", "protocol", "url")

    def __init__(self) -> None:
        self.url: str | None = None
        self.protocol: str | None = None
        self.extensions = ""
        self._link = SocketLink(self)

    def __repr__(self) -> str:
        return f"<WebSocket {self._link.state.value} {self.url or ''}>"

    @property
    def ready_state(self) -> ReadyState:
        return _READY_STATE[self._link.state]

    def send(self, message: str | bytes) -> None:
        """Queue ``message`` (text for ``str``, binary for bytes); never blocks."""
        kind = type(message)
        if kind is not bytes and (kind is not str or not message.isascii()):
            message = checked_message(message, "send()")
        link = self._link
        state = link.state
        if state is SocketState.OPEN or state is SocketState.CLOSE_RECEIVED:
            owner = link.owner
            assert owner is not None
            owner.stats.messages_out += 1
            gate = owner.gate
            if gate is not None:
                gate.append((link, message))  # sent once the object's writes are durable
            else:
                assert link.transport is not None
                link.transport.send_message(message)
        elif state is SocketState.CONNECTING:
            link.require_server_end("send")
            if link.early is None:
                link.early = []
            link.early.append(message)
        elif state is SocketState.LOST:
            return  # the peer is gone; its close event is already on its way
        else:
            msg = "send() after close(): this WebSocket was already closed by the server"
            raise InvalidStateError(msg)

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Start (or answer) the closing handshake; a second call is ignored.

        On a socket whose connection is already gone (its close event says 1006) nothing
        can be sent, so the call only marks it closed, whatever the code.
        """
        link = self._link
        if link.state is SocketState.LOST:
            link.move(SocketInput.APP_CLOSE)
            return
        validate_close(code, reason)
        link.require_server_end("close")
        link.close_now(code, reason)

    def accept(self) -> None:
        """Accept this socket as **non-hibernatable**: its events go to the same handlers,
        but it pins its object in memory until it closes. Call it in an object's handler."""
        self._link.require_acceptable("accept")
        owner = CURRENT_OWNER.get()
        if owner is None:
            msg = (
                "accept() must be called in a Durable Object's handler; a worker cannot hold "
                "WebSockets (use ctx.accept_web_socket(ws) for a hibernatable one)"
            )
            raise InvalidStateError(msg)
        owner.accept_non_hibernatable(self._link)

    def serialize_attachment(self, value: Any) -> None:
        """Keep a JSON-compatible copy of ``value`` with the socket; it survives hibernation."""
        link = self._link
        owner = link.owner
        limit = owner.limits.attachment_bytes if owner is not None else Limits().attachment_bytes
        link.attachment = attachment.encode(value, limit)
        link.attachment_version = owner.attachment_version if owner is not None else 0

    def deserialize_attachment(self) -> Any:
        """A fresh copy of the attachment, or None if none was set.

        One written by an older ``attachment_version`` of the class (before a code reload) goes
        through the class's ``upgrade_attachment`` hook first, once: the upgraded value is
        stored back with the current version.
        """
        link = self._link
        text = link.attachment
        if text is None:
            return None
        value = attachment.decode(text)
        owner = link.owner
        if owner is not None and link.attachment_version < owner.attachment_version:
            value = owner.upgrade_attachment(value, link.attachment_version)
            self.serialize_attachment(value)
            stored = link.attachment
            assert stored is not None
            value = attachment.decode(stored)  # the copy, as every later read will see it
        return value


def link_of(ws: WebSocket) -> SocketLink:
    """The runtime's side of ``ws`` (for the runtime, ``ctx`` and the server glue)."""
    return ws._link


@attrs.frozen
class WebSocketRequestResponsePair:
    """For ``ctx.set_web_socket_auto_response(s)``: a message equal to ``request`` (a text
    frame for a ``str``, a binary frame for bytes) is answered with ``response`` (text or
    binary, likewise) by the runtime, without waking the object."""

    request: str | bytes = attrs.field(validator=lambda _, a, v: _require_message(a.name, v))
    response: str | bytes = attrs.field(validator=lambda _, a, v: _require_message(a.name, v))


def _require_message(name: str, value: object) -> None:
    if not isinstance(value, str | bytes):
        msg = f"WebSocketRequestResponsePair: {name} must be a str or bytes, got {type(value).__name__}"
        raise InvalidArgumentError(msg)


def WebSocketPair() -> tuple[WebSocket, WebSocket]:  # noqa: N802 - Cloudflare's name
    """Return ``(client, server)``: accept ``server``, put ``client`` in the 101 Response."""
    client = WebSocket()
    server = WebSocket()
    client._link.peer = server
    server._link.peer = client
    return client, server


def accepted_peer(client: WebSocket) -> SocketLink | None:
    """The server end paired with ``client``, if an object accepted it (for the server glue)."""
    peer = client._link.peer
    return None if peer is None or peer._link.owner is None else peer._link
