"""One WebSocket connection after its handshake: frames over the event loop's own transport.

Once Tornado has answered the upgrade, the socket is handed to an
:class:`asyncio.Protocol` (uvloop's C transport when uvloop runs the loop): every
read takes all the bytes available, :class:`~wsecho.core.frames.FrameParser` turns them
into whole messages in one pass, and each send is one ``transport.write``. No
Tornado ``IOStream``, no future per frame, no timer per socket.

The connection is the socket's :class:`~wsecho.api.websocket.Transport`; what it
receives goes to the :class:`~wsecho.runtime.runtime.Runtime` as the socket events of the
socket's lifecycle. Closing rules (SPEC §5, RFC 6455 §7): a peer's Close is handed
to the object, whose answer (or the runtime's) completes the handshake and then
the server closes TCP first; a Close the server sends waits at most
``close_timeout`` for the peer's; a failed connection (1002, 1007, 1008, 1009)
gets its Close frame, a FIN, and a bounded drain of the peer's input, so that the
peer reads the Close instead of a reset.

Fairness: a read is parsed in passes of at most ``READ_PASS_BYTES``; past that the connection
stops reading and lets the event loop serve the others before it parses the rest.

Slow readers: the transport tells the connection when more than ``HIGH_WATER`` bytes wait for
its peer (``pause_writing``) and when they drained (``resume_writing``). Only such backed-up
connections are measured, in one :class:`SendQueues` ledger per server: a peer over
``max_outgoing`` is cut with 1008, and when all of them together pass ``max_outgoing_total``
the ones with the most queued are cut with 1008 until the rest fit. A connection that keeps
up costs nothing on its send path but one attribute test.

Broadcasts (``ctx.broadcast``) are corked: the frames for one peer wait until the event loop's
next pass (or ``CORK_BYTES``) and leave in one write, so a burst of broadcasts costs each peer
one system call instead of one per message; any other frame for that peer writes them first,
so the order is kept. The one frame is shared by every peer (see :mod:`wsecho.core.fanout`).

Compression (permessage-deflate, RFC 7692) is a subclass, :class:`DeflateConnection`, chosen
at the upgrade: a plain connection's send path does not test for it at all. Every message is
compressed on its own (no context takeover), so no zlib object outlives a message.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Any, cast

from wsecho.core import frames
from wsecho.core.fanout import Overflow
from wsecho.core.lifecycle import WireEffect, WireInput, WireState, wire_transition

if TYPE_CHECKING:
    from wsecho.api.websocket import SocketLink
    from wsecho.core.fanout import Fanout
    from wsecho.runtime.runtime import Runtime

try:  # Tornado's C routine for unmasking frames, when Tornado was built with it (it usually is)
    from tornado.speedups import websocket_mask as unmask
except ImportError:  # pragma: no cover - depends on how Tornado was built
    unmask = frames.unmask

log = logging.getLogger(__name__)

_TEXT = frames.TEXT
_BINARY = frames.BINARY
_PONG = frames.OP_PONG
_PING = frames.OP_PING
_message_frame = frames.message_frame

#: Bytes queued for a peer past which the transport pauses our writing (the connection joins
#: the server's :class:`SendQueues`), and at or below which it resumes it. Set explicitly:
#: asyncio's low mark is 16 KiB, uvloop's 16 bytes.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
#: Input bytes parsed per pass before the connection lets the event loop serve others: about
#: 10,000 of the smallest frames, under 10 ms of parsing (libuv otherwise hands a busy socket
#: up to 32 reads of 256 KiB in a row).
READ_PASS_BYTES = 64 * 1024
#: Broadcast bytes held for one peer before they are written without waiting for the loop's
#: next pass (see Connection._cork): a bound on what corking holds, not on what it saves.
CORK_BYTES = 64 * 1024
#: At most one warning a second about cut peers; the others are counted in the next one.
LOG_EVERY = 1.0
_PING_PAYLOAD = struct.Struct("!d")


class CutLog:
    """Warnings about peers cut for reading too slowly, at most one per ``LOG_EVERY`` seconds."""

    __slots__ = ("_last", "_suppressed")

    def __init__(self) -> None:
        self._last = -LOG_EVERY
        self._suppressed = 0

    def warn(self, url: str | None, reason: str) -> None:
        # The monotonic clock, read only when a peer is cut (never on the send path).
        now = time.monotonic()
        if now - self._last < LOG_EVERY:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more peers cut since the last such line)" if self._suppressed else ""
        log.warning("closing a WebSocket of %s: %s%s", url, reason, more)
        self._last = now
        self._suppressed = 0


class SendQueues:
    """The bytes queued for every backed-up peer of a server: one ledger across connections.

    A connection is a member while its transport holds more than ``HIGH_WATER`` bytes for it
    (from ``pause_writing`` to ``resume_writing`` or its end); every other connection holds at
    most ``HIGH_WATER`` bytes. ``total`` adds each member's size as last looked at; queues drain
    between looks, so it can be high, never low, and it is measured again before anyone is cut.
    """

    __slots__ = ("limit", "members", "total")

    def __init__(self, limit: int) -> None:
        #: The budget for all members together (0: none).
        self.limit = limit
        self.members: set[Connection] = set()
        self.total = 0

    def over_budget(self) -> None:
        """``total`` passed ``limit``: measure, then cut the biggest queues until the rest fit."""
        self.total = sum(conn.look(0) for conn in self.members)
        if self.total <= self.limit:
            return
        for conn in sorted(self.members, key=_queued, reverse=True):
            if self.total <= self.limit:
                break
            conn.cut(
                1008,
                f"the server's queues for all slow peers passed --max-outgoing-total ({self.limit} bytes); "
                f"this peer had the most queued ({conn.queued} bytes)",
            )


def _queued(conn: Connection) -> int:
    return conn.queued


class ConnectionSettings:
    """What every connection of a server shares (one object, not one per socket)."""

    __slots__ = (
        "close_timeout",
        "compression",
        "corked",
        "cut_log",
        "linger",
        "max_message_size",
        "max_outgoing",
        "queues",
        "read_pass_bytes",
        "runtime",
    )

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_message_size: int,
        max_outgoing: int = 16 * 1024 * 1024,
        max_outgoing_total: int = 256 * 1024 * 1024,
        close_timeout: float = 5.0,
        linger: float = 2.0,
        read_pass_bytes: int = READ_PASS_BYTES,
        compression: bool = False,
    ) -> None:
        self.runtime = runtime
        #: Whether upgrades negotiate permessage-deflate (--compression) unless the 101 says.
        self.compression = compression
        self.max_message_size = max_message_size
        self.max_outgoing = max_outgoing
        self.queues = SendQueues(max_outgoing_total)
        self.close_timeout = close_timeout
        self.linger = linger
        self.read_pass_bytes = read_pass_bytes
        self.cut_log = CutLog()
        #: Connections holding broadcast frames until the loop's next pass (see Connection.cork).
        self.corked: list[Connection] = []

    def uncork_all(self) -> None:
        """Write every connection's corked broadcast frames (once per loop pass that broadcast)."""
        corked, self.corked = self.corked, []
        for conn in corked:
            conn.uncork()


class Connection(asyncio.Protocol):
    """The server side of one WebSocket connection."""

    #: The extensions the handshake agreed on (``WebSocket.extensions``): none on a plain one.
    extensions = ""

    __slots__ = (
        "_settings",
        "_timer",
        "backed_up",
        "backlog",
        "cork",
        "cork_bytes",
        "drained",
        "failure",
        "heard",
        "last_seen",
        "leftover",
        "link",
        "parser",
        "ping_payload",
        "ping_sent_at",
        "protocol",
        "queued",
        "registry",
        "stalled_since",
        "transport",
        "url",
        "wire",
    )

    def __init__(
        self,
        link: SocketLink,
        settings: ConnectionSettings,
        leftover: bytes,
        registry: set[Connection],
        *,
        url: str,
        protocol: str | None,
    ) -> None:
        self.link = link
        self.url = url
        self.protocol = protocol
        self._settings = settings
        self.parser = frames.FrameParser(settings.max_message_size, pass_bytes=settings.read_pass_bytes, unmask=unmask)
        self.transport: asyncio.Transport | None = None
        #: Bytes the HTTP layer had read past the upgrade request (frames sent right after it).
        self.leftover = leftover
        self.registry = registry
        #: The closing handshake on the wire (WIRE_TRANSITIONS): the one place it is kept.
        self.wire = WireState.OPEN
        self._timer: asyncio.TimerHandle | None = None
        #: (code, reason) of a failed connection (wire state FAILED), for its web_socket_error.
        self.failure: tuple[int, str] | None = None
        #: Dead-peer detection (the server's ping pass): loop time of the connection or of the
        #: last Pong that answered our Ping, and of our outstanding Ping and its payload.
        self.last_seen = 0.0
        #: Whether the Pong to our Ping came since the last ping pass looked (only that Pong
        #: counts: an unsolicited one proves nothing, RFC 6455 §5.5.3, and data frames prove
        #: that the peer sends, not that it reads).
        self.heard = False
        self.ping_sent_at: float | None = None
        self.ping_payload = b""
        #: Events parsed but held back while the object's queue is long (see _process).
        self.backlog: list[tuple[str, Any]] | None = None
        #: Slow readers: whether this connection is in the server's SendQueues, its queue size at
        #: the last look, the bytes that left the queue since the ping pass last looked, and the
        #: loop time since which none did (a peer whose queue does not drain is dead).
        self.backed_up = False
        self.queued = 0
        #: Broadcast frames for this peer written together at the loop's next pass, and their size.
        self.cork: list[bytes] | None = None
        self.cork_bytes = 0
        self.drained = 0
        self.stalled_since: float | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has the Transport API without being a subclass of it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.registry.add(self)
        self.last_seen = asyncio.get_running_loop().time()
        # Frames the object sent before the handshake finished go out now, first.
        self._settings.runtime.socket_opened(self.link, self, self.url, self.protocol, self.extensions)
        leftover, self.leftover = self.leftover, b""
        if leftover:
            self.data_received(leftover)

    def data_received(self, data: bytes) -> None:
        if self.wire is WireState.FAILED:
            return  # draining after a failure
        parser = self.parser
        events = parser.feed(data)
        if self.backlog is not None:
            self.backlog.extend(events)
        else:
            self._process(events, 0)
        if parser.held and self.backlog is None:  # (with a backlog, _resume continues)
            self._yield()

    def _yield(self) -> None:
        """This pass's budget is spent: read nothing more until the loop has served the others."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.wire is WireState.FAILED:
            return
        transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        if self.transport is None or self.wire is WireState.FAILED or self.backlog is not None:
            return  # gone, failed, or paused for its object (whose _resume continues)
        self._process(self.parser.resume(), 0)
        if self.parser.held:
            self._yield()
        elif self.backlog is None and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _process(self, events: list[tuple[str, Any]], start: int) -> None:
        runtime = self._settings.runtime
        link = self.link
        for i in range(start, len(events)):
            kind, value = events[i]
            if kind is _TEXT or kind is _BINARY:  # the parser's own constants: identity is enough
                if self.wire is not WireState.OPEN and self.wire is not WireState.CLOSE_SENT:
                    continue  # nothing may follow the peer's Close (RFC 6455 §5.5.1)
                pause = runtime.message_received(link, value)
                if pause is not None:
                    # The object has a long queue: handle nothing more from this peer
                    # (not even what this read already brought) until this message starts.
                    self.backlog = events[i + 1 :]
                    self._pause(pause)
                    return
            elif kind == "ping":
                self._write(frames.frame(_PONG, value))
            elif kind == "pong":
                if self.ping_sent_at is not None and value == self.ping_payload:
                    self.heard = True  # the ping pass turns it into a time
            elif kind == "close":
                self._on_close_frame(*value)
            else:  # fail
                self._fail(*value)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.cork = None
        self._leave_queues()
        self._cancel_timer()
        self.transport = None
        failure = self.failure
        if self.wire is WireState.FAILED and failure is not None:
            self._settings.runtime.socket_failed(self.link, *failure)
        else:
            self._settings.runtime.transport_lost(self.link)

    # -- wsecho.api.websocket.Transport ------------------------------------------------------

    def send_message(self, message: str | bytes) -> None:
        self._write(_message_frame(message))

    def send_close(self, code: int | None, reason: str) -> None:
        self._write(frames.frame(frames.OP_CLOSE, frames.close_payload(code, reason)))
        self._carry_out(self._move(WireInput.WROTE_CLOSE))

    def send_fanout(self, fanout: Fanout) -> bool:
        return self._cork(fanout.frame, fanout)

    # -- internals ---------------------------------------------------------------------------

    def _cork(self, frame: bytes, fanout: Fanout) -> bool:
        """Hold a broadcast's frame for this peer until the loop's next pass (or ``CORK_BYTES``),
        so that the broadcasts of one pass (a burst from one sender, a busy room) leave in one
        write per peer instead of one system call per message; False when it was dropped or
        the peer cut (its class's fan-out policy) or the peer is gone."""
        if self.backed_up and self._over_fanout_limit(fanout, len(frame) + self.cork_bytes):
            return False
        transport = self.transport
        if transport is None or transport.is_closing() or self.wire is WireState.FAILED:
            return False
        cork = self.cork
        if cork is None:
            self.cork = [frame]
            self.cork_bytes = len(frame)
            corked = self._settings.corked
            if not corked:
                asyncio.get_running_loop().call_soon(self._settings.uncork_all)
            corked.append(self)
        else:
            cork.append(frame)
            self.cork_bytes += len(frame)
            if self.cork_bytes >= CORK_BYTES:
                self.uncork()
        return True

    def uncork(self) -> None:
        """Write the broadcast frames held for this peer (before anything else is written)."""
        cork = self.cork
        if cork is not None:
            self.cork = None
            self.cork_bytes = 0
            self._write(cork[0] if len(cork) == 1 else b"".join(cork))

    def _write(self, data: bytes) -> bool:
        """Write ``data``; False when the peer is gone (connection_lost reports it) or the
        connection failed, and nothing was written."""
        if self.cork is not None:
            self.uncork()  # the broadcasts sent before this frame go first
        transport = self.transport
        if transport is None or transport.is_closing() or self.wire is WireState.FAILED:
            return False
        transport.write(data)
        if self.backed_up:  # set by pause_writing, which write() itself calls past HIGH_WATER
            # A peer that stops reading must not grow our memory without bound.
            settings = self._settings
            queues = settings.queues
            size = self._measure(len(data))
            if size > settings.max_outgoing:
                self.cut(1008, f"the peer read too slowly (over {settings.max_outgoing} bytes queued)")
            elif queues.limit and queues.total > queues.limit:
                queues.over_budget()
        return True

    def _measure(self, written: int) -> int:
        """Look at the queue of this backed-up connection and update the server's ledger."""
        old = self.queued
        size = self.look(written)
        self._settings.queues.total += size - old
        return size

    def _over_fanout_limit(self, fanout: Fanout, size: int) -> bool:
        """Whether a broadcast's ``size`` bytes would take this backed-up peer's queue past its
        class's limit: then the message is dropped for it, or it is cut with 1008 (counted)."""
        policy = fanout.policy
        if self._measure(0) + size <= policy.queue_bytes:
            return False
        stats = self._settings.runtime.stats
        if policy.overflow is Overflow.DROP:
            stats.fanout_dropped += 1
        else:
            stats.fanout_closed += 1
            self.cut(
                1008,
                f"the peer read too slowly for a broadcast (over its fan-out limit of {policy.queue_bytes} "
                "bytes queued: fanout_queue_bytes)",
            )
        return True

    # -- slow readers (asyncio flow control) ---------------------------------------------

    def pause_writing(self) -> None:
        """More than HIGH_WATER bytes wait for the peer: measure this connection from now on."""
        self.backed_up = True
        self.queued = 0  # not in the ledger's total yet: the next look adds it
        self._settings.queues.members.add(self)

    def resume_writing(self) -> None:
        """The queue drained to LOW_WATER: the peer keeps up again."""
        self._leave_queues()

    def _leave_queues(self) -> None:
        if self.backed_up:
            self.backed_up = False
            queues = self._settings.queues
            queues.members.discard(self)
            queues.total -= self.queued
            self.queued = 0
            self.stalled_since = None

    def look(self, written: int) -> int:
        """The queue's size now (``written`` bytes were just added); counts what left it since."""
        transport = self.transport
        size = transport.get_write_buffer_size() if transport is not None else 0
        self.drained += self.queued + written - size
        self.queued = size
        return size

    def cut(self, code: int, reason: str) -> None:
        """End the connection at once (its queue is dropped); the object gets ``web_socket_error(code)``."""
        self.failure = (code, reason)
        self.cork = None
        self._leave_queues()
        self._settings.cut_log.warn(self.link.ws.url, reason)
        self._carry_out(self._move(WireInput.CUT))

    def _on_close_frame(self, code: int | None, reason: str) -> None:
        self._carry_out(self._move(WireInput.READ_CLOSE))
        self._settings.runtime.peer_closed(self.link, code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection because of the peer: Close(code), FIN, bounded drain, close."""
        if self.wire is not WireState.FAILED:
            self.failure = (code, reason)
        self._carry_out(self._move(WireInput.FAIL), code, reason)

    def _move(self, what: WireInput) -> WireEffect:
        self.wire, effect = wire_transition(self.wire, what)
        return effect

    def _carry_out(self, effect: WireEffect, code: int = 1000, reason: str = "") -> None:
        """Do what the wire table says (its rows name these effects)."""
        if effect is WireEffect.NOTHING:
            return
        if effect is WireEffect.WAIT_FOR_PEER:
            self._set_timer(self._settings.close_timeout, self._close_timed_out)
        elif effect is WireEffect.CLOSE_TRANSPORT:
            # Both Closes crossed: the handshake is complete, and the server closes the TCP
            # connection first (RFC 6455 §7.1.1).
            self._close_transport()
        elif effect is WireEffect.ABORT:
            if self.transport is not None:
                self.transport.abort()
        else:  # FAIL_WITH_CLOSE, FAIL_SILENTLY: Close(code) unless ours is out, FIN, drain
            transport = self.transport
            if transport is None:
                return
            if effect is WireEffect.FAIL_WITH_CLOSE:
                transport.write(frames.frame(frames.OP_CLOSE, frames.close_payload(code, reason[:120])))
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
        if self.backlog is not None:
            return
        if self.parser.held:
            self._yield()  # the rest of the pass that the object's queue interrupted
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def ping(self, now: float) -> None:
        """Send a server ping (dead-peer detection); only a Pong with its payload answers it.

        The payload is the loop time of the ping pass: new for every Ping, and a peer cannot
        answer it without reading it (after everything queued before it).
        """
        self.ping_sent_at = now
        self.ping_payload = _PING_PAYLOAD.pack(now)
        self._write(frames.frame(_PING, self.ping_payload))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class DeflateConnection(Connection):
    """A connection with permessage-deflate: compressed messages in and out."""

    __slots__ = ("extensions", "window_bits")

    def __init__(self, *args: Any, extensions: str, window_bits: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parser.deflate = True
        self.extensions = extensions
        #: The largest window the client lets the server compress with (server_max_window_bits).
        self.window_bits = window_bits

    def send_message(self, message: str | bytes) -> None:
        self._write(frames.deflated_frame(message, self.window_bits))

    def send_fanout(self, fanout: Fanout) -> bool:
        # Every message is compressed on its own (no context takeover), so sockets with the same
        # window share the broadcast's compressed frame (see wsecho.core.fanout).
        return self._cork(fanout.deflated(self.window_bits), fanout)
