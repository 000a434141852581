"""One WebSocket connection after its handshake: frames over the event loop's own transport.

Once Tornado has answered the upgrade, the socket is handed to an
:class:`asyncio.Protocol` (uvloop's C transport when uvloop runs the loop): every
read takes all the bytes available, :class:`~wsecho.frames.FrameParser` turns them
into whole messages in one pass, and each send is one ``transport.write``. No
Tornado ``IOStream``, no future per frame, no timer per socket.

The connection is the socket's :class:`~wsecho.websocket.Transport`; what it
receives goes to the :class:`~wsecho.runtime.Runtime` as the socket events of the
socket's lifecycle. Closing rules (SPEC §5, RFC 6455 §7): a peer's Close is handed
to the object, whose answer (or the runtime's) completes the handshake and then
the server closes TCP first; a Close the server sends waits at most
``close_timeout`` for the peer's; a failed connection (1002, 1007, 1008, 1009)
gets its Close frame, a FIN, and a bounded drain of the peer's input, so that the
peer reads the Close instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from wsecho import frames

if TYPE_CHECKING:
    from wsecho.runtime import Runtime
    from wsecho.websocket import WebSocket

log = logging.getLogger("wsecho.connection")

_TEXT = frames.TEXT
_BINARY = frames.BINARY
_PONG = frames.OP_PONG
_PING = frames.OP_PING
_TEXT_FRAME = frames.OP_TEXT
_BINARY_FRAME = frames.OP_BINARY


class ConnectionSettings:
    """What every connection of a server shares (one object, not one per socket)."""

    __slots__ = ("close_timeout", "linger", "max_message_size", "max_outgoing", "runtime")

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_message_size: int,
        max_outgoing: int = 16 * 1024 * 1024,
        close_timeout: float = 5.0,
        linger: float = 2.0,
    ) -> None:
        self.runtime = runtime
        self.max_message_size = max_message_size
        self.max_outgoing = max_outgoing
        self.close_timeout = close_timeout
        self.linger = linger


class Connection(asyncio.Protocol):
    """The server side of one WebSocket connection."""

    __slots__ = (
        "_closed_by_us",
        "_peer_closed",
        "_settings",
        "_timer",
        "backlog",
        "failure",
        "heard",
        "last_seen",
        "leftover",
        "parser",
        "ping_sent_at",
        "protocol",
        "registry",
        "transport",
        "url",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        settings: ConnectionSettings,
        leftover: bytes,
        registry: set[Connection],
        *,
        url: str,
        protocol: str | None,
    ) -> None:
        self.ws = ws
        self.url = url
        self.protocol = protocol
        self._settings = settings
        self.parser = frames.FrameParser(settings.max_message_size)
        self.transport: asyncio.Transport | None = None
        #: Bytes the HTTP layer had read past the upgrade request (frames sent right after it).
        self.leftover = leftover
        self.registry = registry
        self._peer_closed = False
        self._closed_by_us = False
        self._timer: asyncio.TimerHandle | None = None
        #: (code, reason) once the connection was failed because of the peer.
        self.failure: tuple[int, str] | None = None
        #: Loop time of the last bytes from the peer, and of our outstanding ping (for dead peers).
        self.last_seen = 0.0
        #: Whether the peer sent anything since the last ping pass looked.
        self.heard = False
        self.ping_sent_at: float | None = None
        #: Events parsed but held back while the object's queue is long (see _process).
        self.backlog: list[tuple[str, Any]] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has the Transport API without being a subclass of it.
        self.transport = cast(asyncio.Transport, transport)
        self.registry.add(self)
        self.last_seen = asyncio.get_running_loop().time()
        # Frames the object sent before the handshake finished go out now, first.
        self._settings.runtime.socket_opened(self.ws, self, self.url, self.protocol, "")
        leftover, self.leftover = self.leftover, b""
        if leftover:
            self.data_received(leftover)

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return  # draining after a failure
        # Just a flag: the ping pass turns it into a time. Reading the clock here would cost a
        # call per message (asyncio.get_running_loop() even makes a getpid() system call).
        self.heard = True
        events = self.parser.feed(data)
        if self.backlog is not None:
            self.backlog.extend(events)
        else:
            self._process(events, 0)

    def _process(self, events: list[tuple[str, Any]], start: int) -> None:
        runtime = self._settings.runtime
        ws = self.ws
        for i in range(start, len(events)):
            kind, value = events[i]
            if kind is _TEXT or kind is _BINARY:  # the parser's own constants: identity is enough
                if self._peer_closed:
                    continue  # nothing may follow a Close (RFC 6455 §5.5.1)
                pause = runtime.message_received(ws, value)
                if pause is not None:
                    # The object has a long queue: handle nothing more from this peer
                    # (not even what this read already brought) until this message starts.
                    self.backlog = events[i + 1 :]
                    self._pause(pause)
                    return
            elif kind == "ping":
                self._write(frames.frame(_PONG, value))
            elif kind == "pong":
                self.ping_sent_at = None
            elif kind == "close":
                self._on_close_frame(*value)
            else:  # fail
                self._fail(*value)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self._cancel_timer()
        self.transport = None
        failure = self.failure
        if failure is not None:
            self._settings.runtime.socket_failed(self.ws, *failure)
        else:
            self._settings.runtime.transport_lost(self.ws)

    # -- wsecho.websocket.Transport ------------------------------------------------------

    def send_message(self, message: str | bytes) -> None:
        if isinstance(message, str):  # exact str in practice; isinstance narrows the type
            data = message.encode("utf-8")
            n = len(data)
            # frames.frame(), inlined for the small message: the hot path of every echo
            self._write(bytes((0x81, n)) + data if n < 126 else frames.frame(_TEXT_FRAME, data))
        else:
            n = len(message)
            self._write(bytes((0x82, n)) + message if n < 126 else frames.frame(_BINARY_FRAME, message))

    def send_close(self, code: int | None, reason: str) -> None:
        self._closed_by_us = True
        self._write(frames.frame(frames.OP_CLOSE, frames.close_payload(code, reason)))
        if self._peer_closed:
            # Our Close answers the peer's: the handshake is complete, and the server
            # closes the TCP connection first (RFC 6455 §7.1.1).
            self._close_transport()
        else:
            self._set_timer(self._settings.close_timeout, self._close_timed_out)

    # -- internals ---------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.failure is not None:
            return  # the peer is gone (connection_lost reports it) or the connection failed
        transport.write(data)
        if transport.get_write_buffer_size() > self._settings.max_outgoing:
            # A peer that stops reading must not grow our memory without bound.
            self.failure = (1008, f"the peer read too slowly (over {self._settings.max_outgoing} bytes queued)")
            log.warning("closing a WebSocket of %s: %s", self.ws.url, self.failure[1])
            transport.abort()

    def _on_close_frame(self, code: int | None, reason: str) -> None:
        self._peer_closed = True
        if self._closed_by_us:
            # The peer answered our Close: the handshake is complete.
            self._cancel_timer()
            self._close_transport()
        self._settings.runtime.peer_closed(self.ws, code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection because of the peer: Close(code), FIN, bounded drain, close."""
        self.failure = (code, reason)
        transport = self.transport
        if transport is None:
            return
        if not self._closed_by_us:
            transport.write(frames.frame(frames.OP_CLOSE, frames.close_payload(code, reason[:120])))
        self._closed_by_us = True
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._set_timer(self._settings.linger, self._close_transport)

    def _close_timed_out(self) -> None:
        self._close_transport(abort=True)

    def _close_transport(self, abort: bool = False) -> None:
        self._cancel_timer()
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()

    def _set_timer(self, delay: float, callback: Any) -> None:
        # Only closing connections have a timer; an open one has none.
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause(self, until: asyncio.Future[None]) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
        until.add_done_callback(lambda _: self._resume())

    def _resume(self) -> None:
        backlog, self.backlog = self.backlog or [], None
        if self.transport is None:
            return  # the connection ended meanwhile: its close event was the last one
        self._process(backlog, 0)
        if self.backlog is None and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def ping(self, now: float) -> None:
        """Send a server ping (dead-peer detection); the pong clears ``ping_sent_at``."""
        self.ping_sent_at = now
        self._write(frames.frame(_PING, b""))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
