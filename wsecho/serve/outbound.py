"""Outbound WebSockets: the client connections that objects open with ``ctx.connect_web_socket``.

The runtime holds them while their object hibernates, exactly as it holds accepted sockets:
each connection is the :class:`~wsecho.api.websocket.Transport` of its socket, and its events
(a message, the upstream's Close, a lost connection) go into the runtime like a served
socket's, waking the object. Tornado's client does the handshake and the frames (masked, as
a client's are), with :class:`~wsecho.serve.takeover.PeerCloseProtocol` so that the upstream's
Close is answered by the object (or the runtime for it), as on the server side
(docs/decisions/0011-outbound-websockets.md).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import TYPE_CHECKING, Any

import tornado.httpclient
import tornado.httputil
import tornado.iostream
import tornado.websocket

from wsecho.core.errors import OutboundConnectError
from wsecho.core.fanout import Overflow
from wsecho.serve.takeover import client_protocol, client_request, queued_bytes

if TYPE_CHECKING:
    from wsecho.api.websocket import SocketLink
    from wsecho.core.fanout import Fanout
    from wsecho.runtime.runtime import Runtime

log = logging.getLogger(__name__)

#: Seconds the TCP connection, the TLS handshake and the upstream's 101 may take together.
CONNECT_TIMEOUT = 10.0


class Dialer:
    """Opens and keeps the outbound connections of one runtime (one process)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        ca_file: str | None = None,
        max_message_size: int = 10 * 1024 * 1024,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        self.runtime = runtime
        self.connect_timeout = connect_timeout
        #: PEM file of the CAs to trust for wss:// (None: the system's).
        self.ca_file = ca_file
        self.max_message_size = max_message_size
        self.ping_interval = ping_interval or None
        self.ping_timeout = ping_timeout or None
        self.connections: set[OutboundConnection] = set()
        #: The TLS context of wss:// and the CA file it was made with (made on first use).
        self._tls: tuple[str | None, ssl.SSLContext] | None = None

    @property
    def open(self) -> int:
        return len(self.connections)

    async def connect(self, link: SocketLink, url: str, protocols: tuple[str, ...], headers: dict[str, str]) -> None:
        tls = self.tls() if url.startswith("wss:") else None
        request = client_request(url, self.connect_timeout, headers, tls)
        conn = OutboundConnection(self, link, url, request, protocols)
        self.connections.add(conn)
        try:
            await conn.connect_future
        except Exception as exc:
            self.forget(conn)
            conn.tcp_client.close()
            self.runtime.stats.outbound_failed += 1
            raise self._failure(url, exc) from exc

    def tls(self) -> ssl.SSLContext:
        """The context that checks wss:// upstreams: the system's CAs, or only ``ca_file``'s.

        A context of the dialer's own, not Tornado's process-wide default (cached the first
        time any client uses it, with whatever ``SSL_CERT_FILE`` said then)."""
        if self._tls is None or self._tls[0] != self.ca_file:
            self._tls = (self.ca_file, ssl.create_default_context(cafile=self.ca_file))
        return self._tls[1]

    def _failure(self, url: str, exc: Exception) -> OutboundConnectError:
        what = f"connect_web_socket({url!r})"
        if isinstance(exc, tornado.httpclient.HTTPClientError) and exc.code != 599:
            msg = f"{what}: the upstream answered {exc.code} {exc.message or ''} instead of 101".replace("  ", " ")
            return OutboundConnectError(url, exc.code, msg)
        if isinstance(exc, tornado.httpclient.HTTPClientError | TimeoutError):
            msg = f"{what}: no answer within {self.connect_timeout:g} s (--outbound-connect-timeout)"
            return OutboundConnectError(url, None, msg)
        msg = f"{what}: could not connect: {exc or type(exc).__name__}"
        return OutboundConnectError(url, None, msg)

    def forget(self, conn: OutboundConnection) -> None:
        self.connections.discard(conn)


class OutboundConnection(tornado.websocket.WebSocketClientConnection):
    """One outbound WebSocket: Tornado's client connection, reporting to the runtime, and the
    :class:`~wsecho.api.websocket.Transport` of its socket."""

    def __init__(
        self,
        dialer: Dialer,
        link: SocketLink,
        url: str,
        request: tornado.httpclient.HTTPRequest,
        protocols: tuple[str, ...],
    ) -> None:
        self.dialer = dialer
        self.runtime = dialer.runtime
        self.link = link
        self.url = url
        self.opened = False
        self.peer_closed = False
        #: Why the connection was failed because of the upstream (1002, 1007, 1009).
        self.failure: tuple[int, str] | None = None
        self.object_closed = False
        super().__init__(
            request,
            max_message_size=dialer.max_message_size,
            ping_interval=dialer.ping_interval,
            ping_timeout=dialer.ping_timeout,
            subprotocols=list(protocols) if protocols else None,
        )

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol:
        return client_protocol(self, self.params)

    async def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> None:
        await super().headers_received(start_line, headers)
        if self.protocol is not None and not self.opened:
            # Before any frame is read (the frame loop only starts on the next turn of the loop).
            self.opened = True
            self.runtime.outbound_opened(self.link, self, self.url, self.selected_subprotocol)

    def on_message(self, message: str | bytes) -> Any:
        # A future means the object's queue is long: nothing more is read until it resolves.
        return self.runtime.message_received(self.link, message)

    def on_peer_close(self, code: int | None, reason: str) -> None:
        self.peer_closed = True
        self.runtime.peer_closed(self.link, code, reason)

    def on_failure(self, code: int, reason: str) -> None:
        if self.failure is None and not self.object_closed:
            self.failure = (code, reason)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.dialer.forget(self)
        self.protocol = None  # closed: nothing more goes out
        if not self.opened or self.peer_closed:
            return
        if self.failure is not None:
            self.runtime.socket_failed(self.link, *self.failure)
        else:
            self.runtime.transport_lost(self.link)

    # -- wsecho.api.websocket.Transport ----------------------------------------------------

    def send_message(self, message: str | bytes) -> None:
        protocol = self.protocol
        if protocol is None:
            return  # the upstream is gone; on_connection_close reports it
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            protocol.write_message(message, binary=isinstance(message, bytes))

    def send_close(self, code: int | None, reason: str) -> None:
        self.object_closed = True
        self.close(code, reason or None)

    def send_fanout(self, fanout: Fanout) -> bool:
        """A broadcast reaches an outbound socket too, framed (and masked) for it alone: the
        broadcast's one frame is a server's, unmasked, which a client may not send."""
        protocol = self.protocol
        stream = protocol.stream if protocol is not None else None
        if protocol is None or stream is None or stream.closed():
            return False
        policy = fanout.policy
        if queued_bytes(stream) + len(fanout.message) > policy.queue_bytes:
            stats = self.runtime.stats
            if policy.overflow is Overflow.DROP:
                stats.fanout_dropped += 1
                return False
            stats.fanout_closed += 1
            self.failure = (1008, f"the upstream read too slowly for a broadcast (over {policy.queue_bytes} bytes)")
            stream.close()
            return False
        try:
            protocol.write_message(fanout.message, binary=isinstance(fanout.message, bytes))
        except tornado.websocket.WebSocketClosedError:
            return False
        return True
