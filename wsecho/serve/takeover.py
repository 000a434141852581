"""The one module that reads Tornado's private fields: taking a connected socket away from
IOStream after the handshake, serving a listener with wsecho's own accept loop, and (for
objects mounted in a Tornado application) a WebSocket protocol that lets the object answer
the peer's Close.

:func:`check_tornado` runs at import and fails loudly, naming the field, if a Tornado
release renames one of them; every integration test goes through both paths.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from asyncio import Future
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.tcpserver
import tornado.web
import tornado.websocket
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httputil import HTTPConnection
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream

from wsecho.core.frames import valid_close_code
from wsecho.core.wording import counted
from wsecho.serve.acceptor import Acceptor, RateLimitedWarning, open_file_limit

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


#: The admin listener's listen queue (Tornado's default).
ADMIN_BACKLOG = 128


class _TakenSocket:
    __slots__ = ("leftover", "sock")

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self.leftover = leftover


def take_socket(stream: IOStream) -> _TakenSocket:
    """Take the connected socket away from Tornado, with the bytes it read past the request.

    Tornado's IOStream stops watching the descriptor and forgets it; from here the
    event loop's own transport owns it. (This reaches into IOStream: the read buffer
    and the registration state are not public. Tests cover it; tornado is pinned <7.)
    """
    leftover = _release(stream)
    fd = stream.socket.detach()
    return _TakenSocket(socket.socket(fileno=fd), leftover)


def take_tls_socket(stream: SSLIOStream) -> tuple[ssl.SSLSocket, bytes]:
    """Take the established ``ssl.SSLSocket`` away from Tornado's SSLIOStream, with the
    decrypted bytes it read past the request.

    The TLS session lives in the SSLSocket, which neither asyncio nor uvloop can adopt; a
    :class:`wsecho.serve.tls.TLSTransport` drives it from here (docs/decisions/0004-tls.md).
    """
    leftover = _release(stream)
    sock = stream.socket
    assert isinstance(sock, ssl.SSLSocket)
    return sock, leftover


def queued_bytes(stream: IOStream) -> int:
    """Bytes written to ``stream`` that the kernel has not taken yet: IOStream keeps no public
    count (a mounted socket's broadcast compares it with the fan-out limit)."""
    return int(stream._total_write_index - stream._total_write_done_index)


def _release(stream: IOStream) -> bytes:
    """Make ``stream`` stop watching its descriptor; return what it had read and not consumed."""
    leftover = bytes(stream._read_buffer[: stream._read_buffer_size])
    if stream._state is not None:
        IOLoop.current().remove_handler(stream.fileno())
        stream._state = None
    return leftover


class ListenerOwner(Protocol):
    """What a :class:`Listener` needs from the application's gateway (passed down, not imported)."""

    refused: Counter[str]

    def websockets(self) -> int: ...

    def refuse_over_http_limit(self, delegate: tornado.httputil.HTTPMessageDelegate, limit: int) -> None:
        """Make ``delegate``'s request be answered 503: its connection is over ``limit``."""
        ...


class Listener(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server with its accept loop replaced and every connection counted.

    Plain HTTP connections (keep-alive ones too) count against ``max_http``: a request on
    a connection beyond it is answered 503 and the connection closed. Every connection,
    HTTP or WebSocket, counts against ``fd_cap`` (from RLIMIT_NOFILE): beyond it a new
    connection is closed at accept, which keeps descriptors for the admin listener,
    storage and the connections already open.

    This reaches into TCPServer (``_sockets``, ``_handlers``, ``_handle_connection``):
    :func:`check_tornado` verifies them when the module loads.
    """

    gateway: ListenerOwner | None = None
    max_http = 0
    fd_cap: int | None = None
    http_open = 0
    pause_warning: RateLimitedWarning | None = None
    cap_warning: RateLimitedWarning | None = None
    accept_pauses = 0
    backlog = ADMIN_BACKLOG

    def configure_limits(
        self, gateway: ListenerOwner | None, *, max_http: int, fd_cap: int | None, backlog: int
    ) -> None:
        self.gateway = gateway
        self.max_http = max_http
        self.fd_cap = fd_cap
        self.backlog = backlog
        self.pause_warning = RateLimitedWarning(log)
        self.cap_warning = RateLimitedWarning(log)
        self._over: set[IOStream] = set()

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            acceptor = Acceptor(sock, self._accepted, self._paused, self.backlog)
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = acceptor.remove

    def open_connections(self) -> int:
        websockets = self.gateway.websockets() if self.gateway is not None else 0
        return self.http_open + websockets

    def _paused(self, exc: OSError, delay: float) -> None:
        self.accept_pauses += 1
        assert self.pause_warning is not None
        limit = open_file_limit()
        self.pause_warning.warn(
            "cannot accept connections: %s (the open-file limit, ulimit -n, is %s; open connections: "
            "%d); not accepting for %gs, the waiting clients stay queued",
            exc.strerror,
            "unlimited" if limit is None else limit,
            self.open_connections(),
            delay,
        )

    def _accepted(self, conn: socket.socket, address: Any) -> None:
        if self.fd_cap is not None and self.open_connections() >= self.fd_cap:
            conn.close()
            if self.gateway is not None:
                self.gateway.refused["descriptors"] += 1
            assert self.cap_warning is not None
            self.cap_warning.warn(
                "closed a new connection at accept: %s open, the most that fit "
                "under the open-file limit (ulimit -n %s) with descriptors kept in reserve",
                counted(self.fd_cap, "connection is", "connections are"),
                open_file_limit(),
            )
            return
        self._handle_connection(conn, address)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        self.http_open += 1
        if self.max_http and self.http_open > self.max_http:
            self._over.add(stream)
            assert self.gateway is not None
            self.gateway.refused["http_limit"] += 1
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: HTTPConnection) -> tornado.httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = cast(HTTP1Connection, request_conn).stream
        # (Tornado asks for a delegate before each request on the connection.)
        if self.max_http and stream in self._over and self.gateway is not None:
            self.gateway.refuse_over_http_limit(delegate, self.max_http)
        return delegate

    def on_close(self, server_conn: object) -> None:
        self.http_open -= 1
        if self.max_http:
            self._over.discard(cast(HTTP1ServerConnection, server_conn).stream)
        super().on_close(server_conn)


class PeerCloseHandler(Protocol):
    """What :class:`PeerCloseProtocol` tells its handler (wsecho.serve.mount's handler)."""

    def on_peer_close(self, code: int | None, reason: str) -> None: ...

    def on_failure(self, code: int, reason: str) -> None:
        """The connection is failed because of the peer (1002, 1007, 1009); the Close goes out."""
        ...


class PeerCloseProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, except that the peer's Close is not echoed at once.

    Tornado answers a Close with the same code before any handler sees it; a Durable Object
    answers with its own code and reason (or the runtime does, with the peer's code, once
    ``web_socket_close`` ran). So the Close goes to the handler, whose object's
    ``ws.close()`` then calls Tornado's ``close()``, which writes it and closes TCP first.
    """

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        # Tornado closes with 1009 itself (a message over max_message_size): say why first.
        if code == 1009 and not self.server_terminated:
            cast(PeerCloseHandler, self.handler).on_failure(code, reason or "message too big")
        super().close(code, reason)

    failed = False

    def _fail(self, code: int, reason: str) -> None:
        self.failed = True
        cast(PeerCloseHandler, self.handler).on_failure(code, reason)
        super().close(code, reason)

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if self.client_terminated:
            return None
        if opcode == 0x1 and not self._frame_compressed:
            # Decoded once, here (Tornado would abort on bad UTF-8 instead of Close 1007).
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in a text message")
                return None
            return self._run_callback(self.handler.on_message, text)
        if opcode != 0x8:
            return super()._handle_message(opcode, data)
        self.client_terminated = True
        if self.failed:  # the peer's answer to the Close of a failed connection: just end it
            self.close()
            return None
        code = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else None
        try:
            reason = data[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "invalid UTF-8 in a Close reason")
            return None
        if len(data) == 1 or (code is not None and not valid_close_code(code)):
            self._fail(1002, f"invalid close code {code}" if code is not None else "a one-byte Close payload")
            return None
        self.close_code, self.close_reason = code, reason or None
        handler = cast(PeerCloseHandler, self.handler)
        handler.on_peer_close(code, reason)
        if self.server_terminated:
            self.close()  # the peer answered our Close: the server closes TCP first
        return None


def peer_close_protocol(handler: tornado.websocket.WebSocketHandler) -> tornado.websocket.WebSocketProtocol | None:
    """``WebSocketHandler.get_websocket_protocol`` with :class:`PeerCloseProtocol` (RFC 6455 only)."""
    if handler.request.headers.get("Sec-WebSocket-Version") != "13":
        return None
    params = tornado.websocket._WebSocketParams(
        ping_interval=handler.ping_interval,
        ping_timeout=handler.ping_timeout,
        max_message_size=handler.max_message_size,
        compression_options=handler.get_compression_options(),
    )
    return PeerCloseProtocol(handler, False, params)


def client_request(
    url: str, timeout: float, headers: dict[str, str], tls: ssl.SSLContext | None
) -> tornado.httpclient.HTTPRequest:
    """The handshake request of an outbound WebSocket, with the client's defaults filled in
    as ``tornado.websocket.websocket_connect`` fills them (through Tornado's private proxy)."""
    request = tornado.httpclient.HTTPRequest(
        url,
        headers=tornado.httputil.HTTPHeaders(headers),
        connect_timeout=timeout,
        request_timeout=timeout,
        ssl_options=tls,
    )
    proxy = tornado.httpclient._RequestProxy(request, tornado.httpclient.HTTPRequest._DEFAULTS)
    return cast(tornado.httpclient.HTTPRequest, proxy)


def client_protocol(
    handler: tornado.websocket.WebSocketClientConnection, params: tornado.websocket._WebSocketParams
) -> tornado.websocket.WebSocketProtocol:
    """:class:`PeerCloseProtocol` for an outbound WebSocket (its frames masked, as a client's must be)."""
    return PeerCloseProtocol(handler, True, params)


def check_tornado(
    tcp_server: type[tornado.tcpserver.TCPServer] = tornado.tcpserver.TCPServer,
    iostream: type[IOStream] = IOStream,
    version: tuple[int, ...] = tornado.version_info,
    protocol: type[tornado.websocket.WebSocketProtocol13] = tornado.websocket.WebSocketProtocol13,
) -> None:
    """Fail loudly, naming the field, if the Tornado internals that :class:`Listener` and
    :func:`take_socket` use changed (run at import; a test runs it on stand-ins too)."""

    def missing_fields() -> list[str]:
        server = tcp_server()
        sock = socket.socket()
        try:
            stream = iostream(sock)
            checks = (
                ("TCPServer._sockets", isinstance(getattr(server, "_sockets", None), dict)),
                ("TCPServer._handlers", isinstance(getattr(server, "_handlers", None), dict)),
                ("TCPServer._handle_connection", callable(getattr(server, "_handle_connection", None))),
                ("IOStream._read_buffer", isinstance(getattr(stream, "_read_buffer", None), bytearray)),
                ("IOStream._read_buffer_size", isinstance(getattr(stream, "_read_buffer_size", None), int)),
                ("IOStream._state", hasattr(stream, "_state")),
                ("IOStream._total_write_index", isinstance(getattr(stream, "_total_write_index", None), int)),
                (
                    "IOStream._total_write_done_index",
                    isinstance(getattr(stream, "_total_write_done_index", None), int),
                ),
                ("WebSocketProtocol13._handle_message", callable(getattr(protocol, "_handle_message", None))),
                ("WebSocketProtocol._run_callback", callable(getattr(protocol, "_run_callback", None))),
                ("websocket._WebSocketParams", callable(getattr(tornado.websocket, "_WebSocketParams", None))),
                ("httpclient._RequestProxy", callable(getattr(tornado.httpclient, "_RequestProxy", None))),
                (
                    "HTTPRequest._DEFAULTS",
                    isinstance(getattr(tornado.httpclient.HTTPRequest, "_DEFAULTS", None), dict),
                ),
            )
        finally:
            sock.close()
        return [name for name, ok in checks if not ok]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # IOStream() asks for the current event loop, and at import there is none: Python
        # 3.12 and 3.13 warn ("There is no current event loop") and 3.14 raises. Lend it a
        # loop of its own for the check, and close it.
        async def in_the_loop() -> list[str]:
            return missing_fields()

        loop = IOLoop(make_current=False)
        try:
            missing = loop.run_sync(in_the_loop)
        finally:
            loop.close()
    else:
        missing = missing_fields()
    if missing or version[0] != 6:
        found = ".".join(map(str, version))
        msg = f"wsecho needs Tornado 6 with {', '.join(missing) or 'its internals'}; found Tornado {found}"
        raise ImportError(msg)


check_tornado()
