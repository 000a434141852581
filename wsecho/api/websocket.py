"""The application's view of a WebSocket: ``WebSocket``, ``WebSocketPair`` and ``ReadyState``.

A server-side :class:`WebSocket` belongs to the object that accepted it, not to
the object's instance, so it outlives hibernation with its state (including
"the server already closed this socket"). Frames go out through a
:class:`Transport` that the server glue attaches once the handshake is done.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from wsecho.api import attachment
from wsecho.api.codec import utf8
from wsecho.core.errors import InvalidArgumentError, InvalidStateError
from wsecho.core.lifecycle import Final, SocketInput, SocketState, socket_transition
from wsecho.core.limits import Limits

if TYPE_CHECKING:
    from wsecho.runtime.runtime import ObjectHost

#: RFC 6455 §5.5: a control frame payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON_BYTES = 123
#: Codes an endpoint may not put in a Close frame (RFC 6455 §7.4.1).
UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})


class ReadyState(enum.IntEnum):
    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


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


@attrs.define(eq=False, repr=False)
class WebSocket:
    """One end of a WebSocket connection, as handlers see it."""

    url: str | None = None
    protocol: str | None = None
    extensions: str = ""
    _state: SocketState = SocketState.CONNECTING
    _peer: WebSocket | None = None
    #: The object that accepted this (server) end; set by ``accept_web_socket``.
    _host: ObjectHost | None = None
    _hibernatable: bool = False
    _transport: Transport | None = None
    #: Frames sent before the handshake finished, and a Close if one was asked for.
    _early: list[str | bytes] | None = None
    _early_close: tuple[int | None, str] | None = None
    _tags: tuple[str, ...] = ()
    #: The attachment as compact JSON text (see wsecho.api.attachment), or None.
    _attachment: str | None = None
    #: When the runtime last answered this socket with the auto-response.
    _auto_response_at: datetime | None = None

    def __repr__(self) -> str:
        return f"<WebSocket {self._state.value} {self.url or ''}>"

    @property
    def ready_state(self) -> ReadyState:
        return _READY_STATE[self._state]

    def send(self, message: str | bytes) -> None:
        """Queue ``message`` (text for ``str``, binary for bytes); never blocks."""
        kind = type(message)
        if kind is not str and kind is not bytes:
            if isinstance(message, bytearray | memoryview):
                message = bytes(message)
            elif not isinstance(message, str | bytes):
                msg = f"send() takes str or bytes, not {type(message).__name__}"
                raise InvalidArgumentError(msg)
        if isinstance(message, str) and not message.isascii():  # isascii() reads a flag: free
            utf8(message, "send(): the message")  # a lone surrogate fails here, not when sent
        state = self._state
        if state is SocketState.OPEN or state is SocketState.CLOSE_RECEIVED:
            assert self._host is not None
            self._host.runtime.stats.messages_out += 1
            gate = self._host.gate
            if gate is not None:
                gate.append((self, message))  # sent once the object's writes are durable
            else:
                assert self._transport is not None
                self._transport.send_message(message)
        elif state is SocketState.CONNECTING:
            self._require_server_end("send")
            if self._early is None:
                self._early = []
            self._early.append(message)
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
        if self._state is SocketState.LOST:
            self._move(SocketInput.APP_CLOSE)
            return
        validate_close(code, reason)
        self._require_server_end("close")
        self._close_unchecked(code, reason)

    def _close_unchecked(self, code: int | None, reason: str) -> None:
        before = self._state
        self._move(SocketInput.APP_CLOSE)
        if before is SocketState.OPEN or before is SocketState.CLOSE_RECEIVED:
            gate = self._host.gate if self._host is not None else None
            if gate is not None:
                gate.append((self, CloseFrame(code, reason)))
            else:
                assert self._transport is not None
                self._transport.send_close(code, reason)
        elif before is SocketState.CONNECTING:
            self._early_close = (code, reason)

    def accept(self) -> None:
        """Accept this socket as **non-hibernatable**: its events go to the same handlers,
        but it pins its object in memory until it closes. Call it in an object's handler."""
        self._require_acceptable("accept")
        from wsecho.runtime.runtime import accept_non_hibernatable  # runtime imports this module

        accept_non_hibernatable(self)

    def serialize_attachment(self, value: Any) -> None:
        """Keep a JSON-compatible copy of ``value`` with the socket; it survives hibernation."""
        limit = self._host.runtime.limits.attachment_bytes if self._host else Limits().attachment_bytes
        self._attachment = attachment.encode(value, limit)

    def deserialize_attachment(self) -> Any:
        """A fresh copy of the attachment, or None if none was set."""
        return None if self._attachment is None else attachment.decode(self._attachment)

    def _emit(self, frame: str | bytes | CloseFrame) -> None:
        """Send a frame an output gate held back."""
        if self._transport is None:
            return
        if isinstance(frame, CloseFrame):
            self._transport.send_close(frame.code, frame.reason)
        else:
            self._transport.send_message(frame)

    def _move(self, what: SocketInput) -> Final:
        self._state, final = socket_transition(self._state, what)
        return final

    def _require_acceptable(self, what: str) -> None:
        """Raise unless this is the server end of a new pair that nothing accepted yet."""
        if self._host is not None:
            msg = f"{what}(): this WebSocket was already accepted"
            raise InvalidStateError(msg)
        if self._peer is None or self._state is not SocketState.CONNECTING:
            msg = f"{what}() takes the server end of a new WebSocketPair"
            raise InvalidStateError(msg)

    def _require_server_end(self, what: str) -> None:
        if self._host is None:
            msg = (
                f"{what}() on a WebSocket that no object accepted: call "
                "ctx.accept_web_socket(server) first (the client end only goes into "
                "Response(status=101, web_socket=client))"
            )
            raise InvalidStateError(msg)

    def _attach(self, transport: Transport, protocol: str | None, extensions: str) -> None:
        """The handshake finished: frames now go out through ``transport``."""
        self._transport = transport
        self.protocol = protocol
        self.extensions = extensions
        self._move(SocketInput.HANDSHAKE_DONE)
        early, self._early = self._early, None
        for message in early or ():
            transport.send_message(message)
        if self._early_close is not None:
            code, reason = self._early_close
            self._early_close = None
            transport.send_close(code, reason)


@attrs.frozen
class WebSocketRequestResponsePair:
    """For ``ctx.set_web_socket_auto_response``: a text frame equal to ``request`` is
    answered with ``response`` by the runtime, without waking the object."""

    request: str = attrs.field(validator=lambda _, a, v: _require_str(a.name, v))
    response: str = attrs.field(validator=lambda _, a, v: _require_str(a.name, v))


def _require_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        msg = f"WebSocketRequestResponsePair: {name} must be a str, got {type(value).__name__}"
        raise InvalidArgumentError(msg)


def WebSocketPair() -> tuple[WebSocket, WebSocket]:  # noqa: N802 - Cloudflare's name
    """Return ``(client, server)``: accept ``server``, put ``client`` in the 101 Response."""
    client = WebSocket()
    server = WebSocket()
    client._peer = server
    server._peer = client
    return client, server


def peer_of(client: WebSocket) -> WebSocket | None:
    """The server end paired with ``client`` (for the server glue)."""
    return client._peer
