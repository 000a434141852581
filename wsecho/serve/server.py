"""The Tornado glue: the only module that imports Tornado.

One catch-all handler, :class:`Gateway`, turns every HTTP request into a
:class:`~wsecho.api.http.Request` for the worker, so the application (not Tornado)
decides what each request gets. Only when the application answers 101 is the
handshake checked and answered; then the socket leaves Tornado for a
:class:`~wsecho.serve.connection.Connection` on the event loop's own transport.
The admin listener (health, readiness, metrics, objects) lives here too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import itertools
import json
import logging
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.client import responses as HTTP_REASONS  # noqa: N812 - a constant
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import attrs
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.tcpserver
import tornado.web
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httputil import HTTPConnection
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError
from tornado.log import access_log

from wsecho.api.http import TEXT_PLAIN, Headers, Request, Response
from wsecho.api.websocket import peer_of
from wsecho.backends.base import Backend, MemoryBackend, SQLiteBackend
from wsecho.core.errors import BadRequestError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.limits import Limits
from wsecho.core.target import AllowedHosts, Target, resolve
from wsecho.runtime.runtime import Runtime
from wsecho.runtime.watchdog import LoopWatchdog
from wsecho.serve.config import RELOADABLE, Settings
from wsecho.serve.connection import Connection, ConnectionSettings
from wsecho.serve.metrics import CONTENT_TYPE, ListenerStats, make_registry, render
from wsecho.serve.sdnotify import Notifier

if TYPE_CHECKING:
    from wsecho.api.app import App
    from wsecho.api.websocket import WebSocket

log = logging.getLogger("wsecho.serve.server")

#: How often the event-loop lag is probed, and the timer the probe sets.
LAG_INTERVAL = 1.0
LAG_PROBE = 0.01
#: How often systemd's STATUS= line is refreshed.
STATUS_INTERVAL = 10.0
#: Bytes queued for a peer that does not read before its connection is cut (close code 1008).
MAX_OUTGOING_BYTES = 16 * 1024 * 1024
#: Bytes queued for all slow peers together before the worst are cut (--max-outgoing-total).
MAX_OUTGOING_TOTAL_BYTES = Settings().max_outgoing_total
#: How long the server waits for the peer's answer to its Close before cutting the connection.
CLOSE_TIMEOUT = 5.0
#: The request header that carries the client's address (the TCP peer), as on Cloudflare.
CLIENT_ADDRESS_HEADER = "CF-Connecting-IP"
#: Request headers larger than this are refused (Tornado closes the connection).
MAX_HEADER_BYTES = 16 * 1024
#: A request body must arrive within this time.
BODY_TIMEOUT = 30.0

#: The most objects one /objects answer lists (?limit=), so that one request's work is bounded.
MAX_OBJECTS_LISTED = 10_000
#: Descriptors kept free under RLIMIT_NOFILE, beyond those open at start, for the admin
#: listener, storage and logs (an eighth of the limit, at most this): connections beyond
#: the rest are closed at accept.
MAX_RESERVED_FDS = 64
#: The admin listener's listen queue (Tornado's default).
ADMIN_BACKLOG = 128
#: When accept() fails for lack of descriptors or memory, the listener pauses this long,
#: doubling up to the maximum while it keeps failing (Go's net/http: 5 ms up to 1 s).
ACCEPT_BACKOFF = 0.05
MAX_ACCEPT_BACKOFF = 1.0
#: A repeated warning (out of descriptors, connections refused) is logged at most this often.
WARNING_INTERVAL = 60.0
#: accept() errors that a pause cures: the process or the system ran out of descriptors,
#: or the kernel out of buffers. Retrying at once would fail again (the listener stays
#: readable), so the loop would spin.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Handshake response headers that Tornado computes itself.
_HANDSHAKE_HEADERS = frozenset(
    {"upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions"}
)


def handshake_problem(
    start_line: tornado.httputil.RequestStartLine, headers: tornado.httputil.HTTPHeaders
) -> tuple[int, str] | None:
    """Why a request the application answered with 101 cannot be upgraded (RFC 6455 §4.2.1).

    A wrong method gets 400, not 405: the application routes every request, so the gateway
    cannot know which methods the resource allows (405 must list them in ``Allow``).
    """
    if start_line.method != "GET":
        return 400, f"Bad WebSocket handshake: the method must be GET, got {start_line.method}"
    if start_line.version == "HTTP/1.0":
        return 400, "Bad WebSocket handshake: the request must be HTTP/1.1, got HTTP/1.0"
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        return 400, 'Bad WebSocket handshake: the "Upgrade" header must be "websocket"'
    tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    if "upgrade" not in tokens:
        return 400, 'Bad WebSocket handshake: the "Connection" header must include "Upgrade"'
    key = headers.get("Sec-WebSocket-Key", "").strip()
    if not key:
        return 400, "Bad WebSocket handshake: missing Sec-WebSocket-Key"
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return 400, "Bad WebSocket handshake: Sec-WebSocket-Key must be 16 bytes in base64"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return 426, "Bad WebSocket handshake: Sec-WebSocket-Version must be 13"
    return None


#: RFC 6455 §1.3: appended to the client's key to compute Sec-WebSocket-Accept.
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode("ascii")


class Gateway(tornado.httputil.HTTPServerConnectionDelegate):
    """Every request: the worker first; on its 101, the upgrade and the hand-over of the socket.

    A bare Tornado connection delegate rather than a ``tornado.web.Application``: the
    application routes every request itself, so Tornado's router and ``RequestHandler``
    (a handler object, default headers, output transforms per request) are not needed.
    """

    def __init__(
        self,
        runtime: Runtime,
        connections: ConnectionSettings,
        registry: set[Connection],
        max_connections: int,
        allowed_origins: tuple[str, ...],
        allowed_hosts: AllowedHosts,
        max_body_memory: int = 0,
    ) -> None:
        self.runtime = runtime
        self.connections = connections
        self.registry = registry
        self.max_connections = max_connections
        self.allowed_origins = allowed_origins
        self.allowed_hosts = allowed_hosts
        self.max_body_memory = max_body_memory
        #: Upgrades between their admission and their connection's registration: they hold
        #: a WebSocket slot, so concurrent upgrades cannot overshoot --max-connections.
        self.upgrading = 0
        #: Bytes of request bodies held (or reserved from Content-Length) right now.
        self.body_bytes = 0
        #: Connections and requests turned away, by reason (exported on /metrics).
        self.refused: Counter[str] = Counter()

    def start_request(self, server_conn: object, request_conn: HTTPConnection) -> Exchange:
        return Exchange(self, cast(HTTP1Connection, request_conn))

    def websockets(self) -> int:
        """Open WebSocket connections plus upgrades holding a slot."""
        return len(self.registry) + self.upgrading

    def take_slot(self) -> bool:
        """Reserve a WebSocket connection slot for an upgrade, before anything awaits."""
        if self.max_connections and self.websockets() >= self.max_connections:
            self.refused["websocket_limit"] += 1
            return False
        self.upgrading += 1
        return True

    def take_body(self, size: int) -> bool:
        """Reserve ``size`` bytes of the request-body budget (--max-body-memory)."""
        if self.max_body_memory and self.body_bytes + size > self.max_body_memory:
            self.refused["body_memory"] += 1
            return False
        self.body_bytes += size
        return True


class Exchange(tornado.httputil.HTTPMessageDelegate):
    """One request and its response."""

    __slots__ = (
        "body",
        "body_reserved",
        "conn",
        "gateway",
        "headers",
        "received",
        "refusal",
        "slot",
        "start_line",
        "started",
        "target",
    )

    def __init__(self, gateway: Gateway, conn: HTTP1Connection) -> None:
        self.gateway = gateway
        self.conn = conn
        self.start_line: tornado.httputil.RequestStartLine | None = None
        self.headers: tornado.httputil.HTTPHeaders | None = None
        self.body: list[bytes] = []
        self.started = 0.0
        self.target: Target | None = None
        #: Set before the headers arrive to answer this request with it and close (a listener
        #: over --max-http-connections), or once it was answered early (body over budget).
        self.refusal: tuple[int, str] | None = None
        #: Whether this request holds a WebSocket slot; bytes of body budget it holds and got.
        self.slot = False
        self.body_reserved = 0
        self.received = 0

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        self.start_line = start_line
        self.headers = headers
        self.started = time.monotonic()
        if self.refusal is not None:
            self._refuse(*self.refusal)
            return
        length = headers.get("Content-Length", "")
        largest = self.conn.params.max_body_size or self.conn.stream.max_buffer_size
        # The whole declared body is reserved now, before any of it arrives: a thousand clients
        # that each send half a body cannot hold more than the budget between them. (Tornado
        # itself refuses a Content-Length over --max-message-size.)
        if length.isdigit() and int(length) <= largest:
            self._reserve_body(int(length))

    def data_received(self, chunk: bytes) -> None:
        if self.refusal is not None:
            return  # answered already; Tornado reads the rest of the body and closes
        extra = self.received + len(chunk) - self.body_reserved
        if extra > 0 and not self._reserve_body(extra):  # a chunked body grows as it comes
            return
        self.received += len(chunk)
        self.body.append(chunk)

    def finish(self) -> None:
        if self.refusal is not None:
            return
        # Tornado waits for the response (or the hand-over) before it reads the next request.
        task = asyncio.ensure_future(self._handle())
        task.add_done_callback(self._give_back)
        task.add_done_callback(_log_crash)

    def on_connection_close(self) -> None:
        # The client left before the request was complete; nothing was started.
        self._give_back()

    def _reserve_body(self, size: int) -> bool:
        if self.gateway.take_body(size):
            self.body_reserved += size
            return True
        limit = self.gateway.max_body_memory
        self._refuse(
            503,
            f"The server is at its limit of {limit} bytes of request bodies in memory "
            f"(--max-body-memory); this request needs {size} more; try again later",
        )
        return False

    def _refuse(self, status: int, text: str) -> None:
        """Answer before the body is read, then close (Tornado reads and drops the rest)."""
        self.refusal = (status, text)
        self._give_back()
        self._plain(status, text, [("Connection", "close")])

    def _give_back(self, _: object = None) -> None:
        """Release this request's WebSocket slot and body budget (once)."""
        gateway = self.gateway
        if self.slot:
            self.slot = False
            gateway.upgrading -= 1
        gateway.body_bytes -= self.body_reserved
        self.body_reserved = 0
        self.body = []

    @property
    def url(self) -> str:
        """``request.url``: the connection's scheme (not one a client claims), the authority, the path."""
        assert self.target is not None
        return f"{self.conn.context.protocol}://{self.target.authority}{self.target.path}"  # type: ignore[attr-defined]

    def _resolve(self) -> Target:
        """The request's host and path, validated (RFC 9112 §3.2) and checked against --allowed-hosts."""
        assert self.start_line is not None
        assert self.headers is not None
        fields = self.headers.get_list("Host")
        local = "" if fields else self._local_authority()
        line = self.start_line
        return resolve(line.method, line.path, line.version, fields, self.gateway.allowed_hosts, local)

    def _local_authority(self) -> str:
        # An HTTP/1.0 request without Host: the address it reached (RFC 9112 §3.3).
        try:
            host, port = self.conn.stream.socket.getsockname()[:2]
        except (AttributeError, OSError):
            return "localhost"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _handle(self) -> None:
        gateway = self.gateway
        headers = self.headers
        start_line = self.start_line
        assert headers is not None
        assert start_line is not None
        try:
            self.target = self._resolve()
        except BadRequestError as exc:
            self._plain(exc.status, str(exc))
            return
        if "websocket" in headers.get("Upgrade", "").lower():
            refusal = self._refuse_upgrade()
            if refusal is not None:
                self._plain(*refusal)
                return
        request = Request(
            url=self.url,
            method=start_line.method,
            headers=Headers(headers.get_all()),
            body=b"".join(self.body),
        )
        # Cloudflare's header for the client's address, so that an application can limit
        # per client; it replaces whatever the client sent, which anyone could forge.
        request.headers.set(CLIENT_ADDRESS_HEADER, getattr(self.conn.context, "remote_ip", "") or "")
        try:
            response = await gateway.runtime.fetch(request)
        except Exception:
            log.exception("the worker's fetch() raised for %s %s", start_line.method, start_line.path)
            self._plain(500, "Internal Server Error")
            return
        if response.status != 101:
            self._respond(response.status, response.headers.items(), response.body or b"")
            return
        assert response.web_socket is not None
        server = peer_of(response.web_socket)
        if server is None or server._host is None:
            log.error(
                "fetch() answered 101 for %s but no object accepted the server end of its "
                "WebSocketPair (call ctx.accept_web_socket(server))",
                start_line.path,
            )
            self._plain(500, "Internal Server Error")
            return
        problem = handshake_problem(start_line, headers)
        if problem is not None:
            status, text = problem
            extra = [("Sec-WebSocket-Version", "13")] if status == 426 else []
            self._plain(status, text, extra)
            gateway.runtime.handshake_failed(server)
            return
        await self._upgrade(server, response, request.url)

    def _refuse_upgrade(self) -> tuple[int, str] | None:
        """Server-wide rules an upgrade request must pass before the application sees it."""
        gateway = self.gateway
        assert self.headers is not None
        assert self.target is not None
        self.slot = gateway.take_slot()
        if not self.slot:
            limit = gateway.max_connections
            return 503, f"The server is at its limit of {limit} WebSocket connections; try again later"
        origin = self.headers.get("Origin")
        if origin is None or "*" in gateway.allowed_origins:
            return None  # not a browser, or any origin allowed
        normalized = origin.strip().rstrip("/").lower()
        if normalized in gateway.allowed_origins:
            return None
        # Browsers do not apply the same-origin policy to WebSockets, so the server does
        # (cross-site WebSocket hijacking): same origin is always fine.
        if urlsplit(normalized).netloc == self.target.authority.lower():
            return None
        return 403, f"Origin {origin!r} is not allowed to open WebSockets here (see --allowed-origins)"

    async def _upgrade(self, server: WebSocket, response: Response, url: str) -> None:
        headers = self.headers
        assert headers is not None
        offered = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        # Like Cloudflare: the application picks by setting the header on its 101 Response.
        chosen = response.headers.get("Sec-WebSocket-Protocol")
        protocol = chosen if chosen in offered else None
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_value(headers['Sec-WebSocket-Key'].strip())}",
        ]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        for name, value in response.headers.items():
            if name.lower() in _HANDSHAKE_HEADERS:
                continue
            if any(c in name + value for c in "\r\n\0"):
                log.error("dropped response header %r: it contains a line break", name)
                continue
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
        self._log(101)
        stream = self.conn.detach()
        try:
            await stream.write(head)
        except StreamClosedError:
            self.gateway.runtime.handshake_failed(server)
            return
        try:
            taken = take_socket(stream)
        except (AttributeError, OSError):  # the client left between the 101 and now
            stream.close()
            self.gateway.runtime.handshake_failed(server)
            return
        connection = Connection(
            server, self.gateway.connections, taken.leftover, self.gateway.registry, url=url, protocol=protocol
        )
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock=taken.sock)
        except OSError:
            taken.sock.close()
            self.gateway.runtime.handshake_failed(server)

    def _plain(self, status: int, text: str, extra: list[tuple[str, str]] | None = None) -> None:
        self._respond(status, [("Content-Type", TEXT_PLAIN), *(extra or [])], text.encode("utf-8"))

    def _respond(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        assert self.start_line is not None
        out = tornado.httputil.HTTPHeaders()
        for name, value in headers:
            out.add(name, value)
        if "Date" not in out:
            out["Date"] = tornado.httputil.format_timestamp(time.time())
        head = self.start_line.method == "HEAD"
        if status >= 200 and status not in (204, 304) and not (head and "Content-Length" in out):
            # The body's own length; for HEAD the application may state the length a GET has.
            out["Content-Length"] = str(len(body))
        line = tornado.httputil.ResponseStartLine("HTTP/1.1", status, HTTP_REASONS.get(status, "Unknown"))
        try:
            self.conn.write_headers(line, out, None if head else body or None)
            self.conn.finish()
        except StreamClosedError:
            pass  # the client left; there is nobody to answer
        self._log(status)

    def _log(self, status: int) -> None:
        # Tornado's access-log line, on Tornado's access logger (--access-log off silences it).
        if not access_log.isEnabledFor(logging.INFO) or access_log.disabled:
            return
        assert self.start_line is not None
        method = access_log.info if status < 400 else access_log.warning if status < 500 else access_log.error
        remote = getattr(self.conn.context, "remote_ip", "?")
        elapsed = (time.monotonic() - self.started) * 1000
        method("%d %s %s (%s) %.2fms", status, self.start_line.method, self.start_line.path, remote, elapsed)


def _log_crash(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a request failed inside the gateway", exc_info=task.exception())


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
    leftover = bytes(stream._read_buffer[: stream._read_buffer_size])
    if stream._state is not None:
        IOLoop.current().remove_handler(stream.fileno())
        stream._state = None
    fd = stream.socket.detach()
    return _TakenSocket(socket.socket(fileno=fd), leftover)


class RateLimitedWarning:
    """One warning line at most every :data:`WARNING_INTERVAL`, counting what it held back."""

    __slots__ = ("_held", "_last", "_logger")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: float | None = None
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < WARNING_INTERVAL:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} more like it in the last {WARNING_INTERVAL:g}s were not logged)" if held else ""
        self._logger.warning(message + suffix, *args)


def open_file_limit() -> int | None:
    """RLIMIT_NOFILE's soft limit (``ulimit -n``), or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def descriptors_in_use() -> int:
    """How many descriptors the process holds (storage, logs, listeners); 32 where unknown."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing it
    except OSError:
        return 32


class Acceptor:
    """Accepts connections on one listening socket, in place of ``tornado.netutil.add_accept_handler``.

    Tornado's handler lets accept() errors escape, and the IOLoop calls it again at once,
    since the listener stays readable: out of descriptors (EMFILE) it spins at 100% CPU and
    logs a traceback per pass. This one pauses the listener instead, like Go's net/http and
    uvicorn: the pending connections wait in the kernel's queue until descriptors are free.
    """

    __slots__ = ("_backoff", "_batch", "_on_connection", "_on_pause", "_removed", "_timer", "sock")

    def __init__(
        self,
        sock: socket.socket,
        on_connection: Callable[[socket.socket, Any], None],
        on_pause: Callable[[OSError, float], None],
        batch: int,
    ) -> None:
        self.sock = sock
        self._on_connection = on_connection
        self._on_pause = on_pause
        # Like Tornado: at most a backlog's worth per wake-up, so other work is not starved.
        self._batch = batch
        self._backoff = ACCEPT_BACKOFF
        self._removed = False
        self._timer: object | None = None
        IOLoop.current().add_handler(sock, self._ready, IOLoop.READ)

    def _ready(self, fd: object, events: int) -> None:
        for _ in range(self._batch):
            if self._removed:
                return
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                return  # every pending connection is taken
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client left while in the queue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._pause(exc)
                return
            self._backoff = ACCEPT_BACKOFF
            self._on_connection(conn, address)

    def _pause(self, exc: OSError) -> None:
        loop = IOLoop.current()
        loop.remove_handler(self.sock)
        delay, self._backoff = self._backoff, min(self._backoff * 2, MAX_ACCEPT_BACKOFF)
        self._timer = loop.call_later(delay, self._resume)
        self._on_pause(exc, delay)

    def _resume(self) -> None:
        self._timer = None
        if not self._removed:
            IOLoop.current().add_handler(self.sock, self._ready, IOLoop.READ)

    def remove(self) -> None:
        """Stop accepting (what ``TCPServer.stop`` calls)."""
        if self._removed:
            return
        self._removed = True
        loop = IOLoop.current()
        if self._timer is not None:
            loop.remove_timeout(self._timer)
            self._timer = None
        else:
            loop.remove_handler(self.sock)


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

    gateway: Gateway | None = None
    max_http = 0
    fd_cap: int | None = None
    http_open = 0
    pause_warning: RateLimitedWarning | None = None
    cap_warning: RateLimitedWarning | None = None
    accept_pauses = 0
    backlog = ADMIN_BACKLOG

    def configure_limits(self, gateway: Gateway | None, *, max_http: int, fd_cap: int | None, backlog: int) -> None:
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
            "cannot accept connections: %s (the open-file limit, ulimit -n, is %s; %d connections "
            "are open); not accepting for %gs, the waiting clients stay queued",
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
                "closed a new connection at accept: %d connections are open, the most that fit "
                "under the open-file limit (ulimit -n %s) with descriptors kept in reserve",
                self.fd_cap,
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
        if self.max_http and stream in self._over and isinstance(delegate, Exchange):
            delegate.refusal = (
                503,
                f"The server is at its limit of {self.max_http} HTTP connections "
                "(--max-http-connections); try again later",
            )
        return delegate

    def on_close(self, server_conn: object) -> None:
        self.http_open -= 1
        if self.max_http:
            self._over.discard(cast(HTTP1ServerConnection, server_conn).stream)
        super().on_close(server_conn)


def check_tornado() -> None:
    """Fail loudly if the Tornado internals :class:`Listener` and :func:`take_socket` use changed."""
    probe = tornado.tcpserver.TCPServer()
    missing = [
        name
        for name, ok in (
            ("TCPServer._sockets", isinstance(getattr(probe, "_sockets", None), dict)),
            ("TCPServer._handlers", isinstance(getattr(probe, "_handlers", None), dict)),
            ("TCPServer._handle_connection", callable(getattr(probe, "_handle_connection", None))),
        )
        if not ok
    ]
    if missing or tornado.version_info[0] != 6:
        msg = f"wsecho needs Tornado 6 with {', '.join(missing) or 'its internals'}; found Tornado {tornado.version}"
        raise ImportError(msg)


check_tornado()


def make_application(
    runtime: Runtime,
    *,
    max_message_size: int,
    registry: set[Connection] | None = None,
    max_connections: int = 0,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: AllowedHosts | None = None,
    max_body_memory: int = 0,
    max_outgoing: int = MAX_OUTGOING_BYTES,
    max_outgoing_total: int = MAX_OUTGOING_TOTAL_BYTES,
    close_timeout: float = CLOSE_TIMEOUT,
) -> Gateway:
    """The application's HTTP side (for ``HTTPServer``); ``registry`` collects the open connections.

    ``allowed_hosts`` defaults to any host: only the caller knows the address it binds
    (:class:`Server` passes ``AllowedHosts.for_listener`` of its own).
    """
    connections = ConnectionSettings(
        runtime,
        max_message_size=max_message_size,
        max_outgoing=max_outgoing,
        max_outgoing_total=max_outgoing_total,
        close_timeout=close_timeout,
    )
    return Gateway(
        runtime,
        connections,
        registry if registry is not None else set(),
        max_connections,
        allowed_origins,
        allowed_hosts if allowed_hosts is not None else AllowedHosts(frozenset(), (), any=True),
        max_body_memory,
    )


class Sweeper:
    """The one periodic callback that hibernates idle objects."""

    def __init__(self, runtime: Runtime) -> None:
        # Often enough that an object hibernates within ~10% of its timeout,
        # never more than every 50 ms nor less than every second.
        interval = min(max(runtime.hibernate_after / 10, 0.05), 1.0)
        self._callback = PeriodicCallback(self._sweep, interval * 1000)
        self._runtime = runtime

    def _sweep(self) -> None:
        try:
            self._runtime.sweep()
        except Exception:
            log.exception("the hibernation sweep failed; it runs again at the next interval")

    def start(self) -> None:
        self._callback.start()

    def stop(self) -> None:
        self._callback.stop()


def utc_now() -> datetime:
    """The wall clock, for auto-response timestamps."""
    return datetime.now(UTC)


def backend_for(data_dir: str) -> Backend:
    """SQLite in ``data_dir``, or memory for ``:memory:``."""
    return MemoryBackend() if data_dir == ":memory:" else SQLiteBackend(data_dir)


class AdminHandler(tornado.web.RequestHandler):
    """Base of the admin endpoints: no caching, no Server header."""

    server: Server

    def initialize(self, server: Server) -> None:
        self.server = server

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        # The same Host rules as the application's port: a DNS-rebound page must not read
        # /metrics or /objects from a browser on this machine.
        request = self.request
        fields = request.headers.get_list("Host")
        try:
            resolve(
                request.method or "GET",
                request.uri or "/",
                request.version,
                fields,
                self.server.admin_hosts,
                request.host,
            )
        except BadRequestError as exc:
            self.text(exc.status, str(exc))

    def compute_etag(self) -> str | None:
        return None

    def text(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain;charset=UTF-8")
        self.finish(body + "\n")


class NotFound(AdminHandler):
    """Every other path (after the Host check, so that it is the same for every path)."""

    def get(self) -> None:
        self.text(404, "Not Found: the admin listener serves /healthz, /readyz, /metrics and /objects")


class Healthz(AdminHandler):
    def get(self) -> None:
        # The event loop answered: the process is alive.
        self.text(200, "ok")


class Readyz(AdminHandler):
    def get(self) -> None:
        phase = self.server.phase
        failure = self.server.runtime.storage_failure()
        if phase == "ready" and failure is not None:
            # Writes fail (a full disk, an I/O error): new work would only be reset with 1011.
            self.text(503, f"storage failing: {failure}")
            return
        self.text(200 if phase == "ready" else 503, phase)


class Metrics(AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(render(self.server.registry))


class Objects(AdminHandler):
    def get(self) -> None:
        limit_arg = self.get_argument("limit", "1000")
        state_arg = self.get_argument("state", None)
        # ASCII digits only: str.isdigit() accepts "²", which int() refuses; and a length
        # bound before int(), which refuses over 4,300 digits.
        if not (limit_arg.isascii() and limit_arg.isdigit() and len(limit_arg) <= 6) or (
            int(limit_arg) > MAX_OBJECTS_LISTED
        ):
            self.text(400, f"limit must be a whole number from 0 to {MAX_OBJECTS_LISTED}, got {limit_arg[:20]!r}")
            return
        states = [s.value for s in ObjectState]
        if state_arg is not None and state_arg not in states:
            self.text(400, f"state must be one of {', '.join(states)}, got {state_arg[:20]!r}")
            return
        state = None if state_arg is None else ObjectState(state_arg)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.server.describe_objects(int(limit_arg), state), indent=1))


class Server:
    """An application served on one address: the HTTP server, the runtime, the sweeper,
    and (with ``admin_port``) the admin listener."""

    def __init__(
        self, app: App, settings: Settings, backend: Backend | None = None, notifier: Notifier | None = None
    ) -> None:
        self.settings = settings
        self.runtime = Runtime(
            app,
            # The event loop's clock (asyncio and uvloop both read CLOCK_MONOTONIC), without
            # the cost of finding the current IOLoop on every call.
            clock=time.monotonic,
            wall_clock=utc_now,
            hibernate_after=settings.hibernate_after,
            limits=Limits(object_storage_bytes=settings.max_object_storage, storage_bytes=settings.max_storage),
            backend=backend if backend is not None else backend_for(settings.data_dir),
        )
        self.notifier = notifier if notifier is not None else Notifier(None)
        #: starting -> ready -> draining -> stopped (what /readyz reports).
        self.phase = "starting"
        self.registry = make_registry(self.runtime, lambda: self.loop_lag, self.listener_stats)
        #: How late the event loop last ran a timer, in seconds.
        self.loop_lag = 0.0
        #: Every open WebSocket connection (for dead-peer pings and shutdown).
        self.connections: set[Connection] = set()
        #: The Host names the admin listener answers to (the application's are the gateway's).
        self.admin_hosts = AllowedHosts.for_listener(settings.allowed_hosts, settings.admin_host)
        self._application = make_application(
            self.runtime,
            max_message_size=settings.max_message_size,
            registry=self.connections,
            max_connections=settings.max_connections,
            allowed_origins=settings.allowed_origins,
            allowed_hosts=AllowedHosts.for_listener(settings.allowed_hosts, settings.host),
            max_body_memory=settings.max_body_memory,
            max_outgoing_total=settings.max_outgoing_total,
        )
        self._http: Listener | None = None
        self._admin: Listener | None = None
        self._sweeper = Sweeper(self.runtime)
        self._periodic: list[PeriodicCallback] = []
        #: Warns while a handler blocks the event loop (None with --warn-blocked 0).
        self.blocked_watch = LoopWatchdog(settings.warn_blocked) if settings.warn_blocked > 0 else None
        self.addresses: list[tuple[str, int]] = []
        self.admin_addresses: list[tuple[str, int]] = []

    async def start(self) -> list[tuple[str, int]]:
        """Open storage, bind and start serving; return the bound ``(host, port)`` pairs."""
        if self.settings.admin_port is not None:
            # The admin listener comes up first, so /readyz can say "starting".
            handlers: list[Any] = [
                (path, handler, {"server": self})
                for path, handler in (
                    (r"/healthz", Healthz),
                    (r"/readyz", Readyz),
                    (r"/metrics", Metrics),
                    (r"/objects", Objects),
                )
            ]
            admin_sockets = tornado.netutil.bind_sockets(self.settings.admin_port, self.settings.admin_host)
            admin = tornado.web.Application(
                handlers, default_handler_class=NotFound, default_handler_args={"server": self}
            )
            self._admin = Listener(admin)
            self._admin.configure_limits(None, max_http=0, fd_cap=None, backlog=ADMIN_BACKLOG)
            self._admin.add_sockets(admin_sockets)
            self.admin_addresses = [s.getsockname()[:2] for s in admin_sockets]
        await self.runtime.start()
        sockets = tornado.netutil.bind_sockets(self.settings.port, self.settings.host, backlog=self.settings.backlog)
        self._http = Listener(
            self._application,
            max_body_size=max(self.settings.max_message_size, 64 * 1024),
            max_header_size=MAX_HEADER_BYTES,
            # Tornado's header timeout: a client that dribbles its request is cut (slowloris).
            idle_connection_timeout=self.settings.handshake_timeout,
            body_timeout=BODY_TIMEOUT,
        )
        self._http.configure_limits(
            self._application,
            max_http=self.settings.max_http_connections,
            fd_cap=self._fd_cap(),
            backlog=self.settings.backlog,
        )
        self._http.add_sockets(sockets)
        self.addresses = [s.getsockname()[:2] for s in sockets]
        self._sweeper.start()
        self._start_periodic(self._measure_lag, LAG_INTERVAL)
        if self.settings.ping_interval > 0:
            self._start_periodic(self._ping_peers, min(max(self.settings.ping_interval / 4, 0.05), 5.0))
        self._start_periodic(self._report_status, STATUS_INTERVAL)
        if self.notifier.watchdog_interval is not None:
            # From the event loop itself: a stuck loop stops the pings and systemd restarts us.
            self._start_periodic(self._watchdog, self.notifier.watchdog_interval)
        if self.blocked_watch is not None:
            self.blocked_watch.start()
        self.phase = "ready"
        self.notifier.ready()
        self._report_status()
        return self.addresses

    def _fd_cap(self) -> int | None:
        """The most connections that fit under RLIMIT_NOFILE with a reserve; warn if the limits do not."""
        limit = open_file_limit()
        if limit is None:
            return None
        reserve = min(MAX_RESERVED_FDS, limit // 8)
        cap = max(limit - descriptors_in_use() - reserve, 1)
        settings = self.settings
        wanted = settings.max_connections + settings.max_http_connections
        log.debug("at most %d connections fit under the open-file limit of %d", cap, limit)
        if not settings.max_connections or not settings.max_http_connections or wanted > cap:
            shown = wanted if settings.max_connections and settings.max_http_connections else "unlimited"
            log.warning(
                "--max-connections %d plus --max-http-connections %d (%s connections) do not fit under "
                "the open-file limit (ulimit -n) of %d with %d descriptors for storage and reserve: at most %d "
                "connections at once, the rest are closed at accept; raise the limit (LimitNOFILE= "
                "under systemd) or lower the options",
                settings.max_connections,
                settings.max_http_connections,
                shown,
                limit,
                limit - cap,
                cap,
            )
        return cap

    def listener_stats(self) -> ListenerStats:
        """What /metrics reports about the listener."""
        gateway = self._application
        listeners = [x for x in (self._http, self._admin) if x is not None]
        return ListenerStats(
            http_connections=self._http.http_open if self._http is not None else 0,
            body_bytes=gateway.body_bytes,
            accept_pauses=sum(x.accept_pauses for x in listeners),
            refused=dict(gateway.refused),
        )

    def _watchdog(self) -> None:
        self.notifier.watchdog()

    def _start_periodic(self, fn: Callable[[], None], seconds: float) -> None:
        callback = PeriodicCallback(fn, seconds * 1000)
        callback.start()
        self._periodic.append(callback)

    def _ping_peers(self, now: float | None = None) -> None:
        """Find dead peers: ping each every --ping-interval; cut those that do not answer within
        --ping-timeout, and those whose send queue has not drained a byte for --ping-timeout.

        Only a Pong carrying our Ping's payload counts (``Connection.heard``): a peer that sends
        but never reads cannot pass by sending unsolicited Pongs or messages. A peer cut here is
        gone as if its network died: ``web_socket_close(1006)``, counted in ``dead_peers``.
        One pass over the open connections instead of one timer per socket.
        """
        if now is None:
            now = asyncio.get_running_loop().time()
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        dead = stalled = 0
        for conn in list(self.connections):
            if conn.backlog is not None:
                continue  # we stopped reading it ourselves (its object is busy): its Pong waits unread
            if conn.backed_up:
                conn.look(0)
                if conn.drained > 0 or conn.stalled_since is None:  # progress, or the first look
                    conn.drained = 0
                    conn.stalled_since = now
                elif now - conn.stalled_since > timeout:
                    conn.abort()
                    stalled += 1
                    continue
            if conn.heard:  # the Pong to our Ping came since the last pass
                conn.heard = False
                conn.last_seen = now
                conn.ping_sent_at = None
            elif conn.ping_sent_at is not None:
                if now - conn.ping_sent_at > timeout:
                    conn.abort()
                    dead += 1
            elif now - conn.last_seen > interval:
                conn.ping(now)
        if dead or stalled:
            self.runtime.counters["dead_peers"] += dead + stalled
            log.info(
                "cut %d WebSocket peers that did not answer a ping within %gs and %d whose send queue "
                "did not drain for %gs",
                dead,
                timeout,
                stalled,
                timeout,
            )

    def _measure_lag(self) -> None:
        loop = IOLoop.current()
        expected = loop.time() + LAG_PROBE

        def probe() -> None:
            self.loop_lag = max(loop.time() - expected, 0.0)

        loop.call_later(LAG_PROBE, probe)

    def status_line(self) -> str:
        states = Counter(h.lifecycle.state.value for h in self.runtime.hosts())
        return (
            f"{self.phase}: {self.runtime.socket_count()} WebSockets, {states['active']} active and "
            f"{states['hibernating']} hibernating objects"
        )

    def _report_status(self) -> None:
        self.notifier.status(self.status_line())

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def admin_port(self) -> int:
        return self.admin_addresses[0][1]

    def describe_objects(self, limit: int, state: ObjectState | None) -> dict[str, Any]:
        """What /objects shows: each object's id, class, state, sockets, idle time and blocker.

        Only ``limit`` objects are described; the others are only counted.
        """
        now = self.runtime.clock()
        hosts = self.runtime.hosts()
        selected = iter(hosts) if state is None else (h for h in hosts if h.lifecycle.state is state)
        listed = []
        for host in itertools.islice(selected, limit):
            lc = host.lifecycle
            active = lc.state is ObjectState.ACTIVE
            listed.append(
                {
                    "id": host.id.hex,
                    "name": host.id.name,
                    "namespace": host.id.namespace,
                    "class": host.cls.__name__,
                    "state": lc.state.value,
                    "sockets": len(host.sockets),
                    "idle_seconds": None if lc.idle_since is None else round(now - lc.idle_since, 3),
                    "hibernate_after": host.hibernate_after,
                    "cannot_hibernate_because": lc.hibernation_blocker() if active else None,
                }
            )
        count = len(hosts) if state is None else len(listed) + sum(1 for _ in selected)
        return {"count": count, "shown": len(listed), "objects": listed}

    def apply(self, settings: Settings) -> list[str]:
        """Apply the reloadable settings (SIGHUP); return the changed ones that need a restart."""
        changes = {name: getattr(settings, name) for name in RELOADABLE}
        ignored = [
            name
            for name in attrs.fields_dict(Settings)
            if name not in RELOADABLE and getattr(settings, name) != getattr(self.settings, name)
        ]
        self.settings = attrs.evolve(self.settings, **changes)
        self.runtime.set_hibernate_after(settings.hibernate_after)
        self._sweeper.stop()
        self._sweeper = Sweeper(self.runtime)
        if self.phase == "ready":
            self._sweeper.start()
        return ignored

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close every WebSocket with 1001, wait (bounded) for the peers,
        commit every pending write and close storage."""
        self.phase = "draining"
        self.notifier.stopping()
        self._report_status()
        if timeout is None:
            timeout = self.settings.drain_timeout
        if self._http is not None:
            self._http.stop()
        self._sweeper.stop()
        self.runtime.close_all(1001, "Going Away")
        deadline = IOLoop.current().time() + timeout
        while self.runtime.socket_count() and IOLoop.current().time() < deadline:
            await asyncio.sleep(0.02)
        if self._http is not None:
            await self._http.close_all_connections()
        await self.runtime.close()
        for callback in self._periodic:
            callback.stop()
        self._periodic.clear()
        if self.blocked_watch is not None:
            self.blocked_watch.stop()
        if self._admin is not None:
            self._admin.stop()
            await self._admin.close_all_connections()
        self.phase = "stopped"
