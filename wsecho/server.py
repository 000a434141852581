"""The Tornado glue: the only module that imports Tornado.

One catch-all handler, :class:`Gateway`, turns every HTTP request into a
:class:`~wsecho.http.Request` for the worker, so the application (not Tornado)
decides what each request gets. Only when the application answers 101 is the
handshake checked and answered; then the socket leaves Tornado for a
:class:`~wsecho.connection.Connection` on the event loop's own transport.
The admin listener (health, readiness, metrics, objects) lives here too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError

from wsecho.backends import Backend, MemoryBackend, SQLiteBackend
from wsecho.config import RELOADABLE, Settings
from wsecho.connection import Connection, ConnectionSettings
from wsecho.http import Request, Response
from wsecho.lifecycle import ObjectState
from wsecho.metrics import CONTENT_TYPE, make_registry, render
from wsecho.runtime import Runtime
from wsecho.sdnotify import Notifier
from wsecho.websocket import peer_of

if TYPE_CHECKING:
    from wsecho.app import App
    from wsecho.websocket import WebSocket

log = logging.getLogger("wsecho.server")

#: How often the event-loop lag is probed, and the timer the probe sets.
LAG_INTERVAL = 1.0
LAG_PROBE = 0.01
#: How often systemd's STATUS= line is refreshed.
STATUS_INTERVAL = 10.0
#: Bytes queued for a peer that does not read before its connection is cut (close code 1008).
MAX_OUTGOING_BYTES = 16 * 1024 * 1024
#: How long the server waits for the peer's answer to its Close before cutting the connection.
CLOSE_TIMEOUT = 5.0
#: Request headers larger than this are refused (Tornado closes the connection).
MAX_HEADER_BYTES = 16 * 1024
#: A request body must arrive within this time.
BODY_TIMEOUT = 30.0

#: Handshake response headers that Tornado computes itself.
_HANDSHAKE_HEADERS = frozenset(
    {"upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions"}
)


def handshake_problem(headers: tornado.httputil.HTTPHeaders) -> tuple[int, str] | None:
    """Why a request the application answered with 101 cannot be upgraded (RFC 6455 §4.2.1)."""
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


class Gateway(tornado.web.RequestHandler):
    """Every request: the worker first; on its 101, the upgrade and the hand-over of the socket."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    runtime: Runtime
    connections: ConnectionSettings
    registry: set[Connection]

    def initialize(
        self,
        runtime: Runtime,
        connections: ConnectionSettings,
        registry: set[Connection],
        max_connections: int,
        allowed_origins: tuple[str, ...],
    ) -> None:
        self.runtime = runtime
        self.connections = connections
        self.registry = registry
        self.max_connections = max_connections
        self.allowed_origins = allowed_origins

    async def get(self, *args: Any, **kwargs: Any) -> None:
        await self._dispatch()

    post = put = patch = delete = head = options = get

    def set_default_headers(self) -> None:
        # The Fetch API adds no Content-Type or Server of its own; nor do we.
        self.clear_header("Content-Type")
        self.clear_header("Server")

    def compute_etag(self) -> str | None:
        return None  # the application sets ETag itself if it wants one

    async def _dispatch(self) -> None:
        req = self.request
        if "websocket" in req.headers.get("Upgrade", "").lower():
            refusal = self._refuse_upgrade()
            if refusal is not None:
                self._plain(*refusal)
                return
        request = Request(
            url=req.full_url(),
            method=req.method or "GET",
            headers=list(req.headers.get_all()),
            body=req.body,
        )
        try:
            response = await self.runtime.fetch(request)
        except Exception:
            log.exception("the worker's fetch() raised for %s %s", req.method, req.uri)
            self._plain(500, "Internal Server Error")
            return
        if response.status != 101:
            self.set_status(response.status)
            for name, value in response.headers.items():
                self.add_header(name, value)
            if response.body:
                self.write(response.body)
            self.finish()
            return
        assert response.web_socket is not None
        server = peer_of(response.web_socket)
        if server is None or server._host is None:
            log.error(
                "fetch() answered 101 for %s but no object accepted the server end of its "
                "WebSocketPair (call ctx.accept_web_socket(server))",
                req.uri,
            )
            self._plain(500, "Internal Server Error")
            return
        problem = handshake_problem(req.headers)
        if problem is not None:
            status, text = problem
            if status == 426:
                self.set_header("Sec-WebSocket-Version", "13")
            self._plain(status, text)
            self.runtime.handshake_failed(server)
            return
        await self._upgrade(server, response)

    async def _upgrade(self, server: WebSocket, response: Response) -> None:
        req = self.request
        offered = [p.strip() for p in req.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        # Like Cloudflare: the application picks by setting the header on its 101 Response.
        chosen = response.headers.get("Sec-WebSocket-Protocol")
        protocol = chosen if chosen in offered else None
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_value(req.headers['Sec-WebSocket-Key'].strip())}",
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
        self.set_status(101)
        self.application.log_request(self)
        stream = self.detach()
        try:
            await stream.write(head)
        except StreamClosedError:
            self.runtime.handshake_failed(server)
            return
        sock = take_socket(stream)
        connection = Connection(
            server, self.connections, sock.leftover, self.registry, url=req.full_url(), protocol=protocol
        )
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock=sock.sock)
        except OSError:
            sock.sock.close()
            self.runtime.handshake_failed(server)

    def _refuse_upgrade(self) -> tuple[int, str] | None:
        """Server-wide rules an upgrade request must pass before the application sees it."""
        if self.max_connections and len(self.registry) >= self.max_connections:
            return 503, f"The server is at its limit of {self.max_connections} WebSocket connections; try again later"
        origin = self.request.headers.get("Origin")
        if origin is None or "*" in self.allowed_origins:
            return None  # not a browser, or any origin allowed
        normalized = origin.strip().rstrip("/").lower()
        if normalized in self.allowed_origins:
            return None
        # Browsers do not apply the same-origin policy to WebSockets, so the server does
        # (cross-site WebSocket hijacking): same origin is always fine.
        if urlsplit(normalized).netloc == self.request.headers.get("Host", "").strip().lower():
            return None
        return 403, f"Origin {origin!r} is not allowed to open WebSockets here (see --allowed-origins)"

    def _plain(self, status: int, text: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain;charset=UTF-8")
        self.finish(text)


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


def make_application(
    runtime: Runtime,
    *,
    max_message_size: int,
    registry: set[Connection] | None = None,
    max_connections: int = 0,
    allowed_origins: tuple[str, ...] = (),
    max_outgoing: int = MAX_OUTGOING_BYTES,
    close_timeout: float = CLOSE_TIMEOUT,
) -> tornado.web.Application:
    """The application's HTTP side; ``registry`` collects the open connections."""
    connections = ConnectionSettings(
        runtime, max_message_size=max_message_size, max_outgoing=max_outgoing, close_timeout=close_timeout
    )
    gateway = {
        "runtime": runtime,
        "connections": connections,
        "registry": registry if registry is not None else set(),
        "max_connections": max_connections,
        "allowed_origins": allowed_origins,
    }
    return tornado.web.Application([(r".*", Gateway, gateway)])


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

    def compute_etag(self) -> str | None:
        return None

    def text(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain;charset=UTF-8")
        self.finish(body + "\n")


class Healthz(AdminHandler):
    def get(self) -> None:
        # The event loop answered: the process is alive.
        self.text(200, "ok")


class Readyz(AdminHandler):
    def get(self) -> None:
        phase = self.server.phase
        self.text(200 if phase == "ready" else 503, phase)


class Metrics(AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(render(self.server.registry))


class Objects(AdminHandler):
    def get(self) -> None:
        limit_arg = self.get_argument("limit", "1000")
        state = self.get_argument("state", None)
        if not limit_arg.isdigit():
            self.text(400, f"limit must be a whole number, got {limit_arg!r}")
            return
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
            backend=backend if backend is not None else backend_for(settings.data_dir),
        )
        self.notifier = notifier if notifier is not None else Notifier(None)
        #: starting -> ready -> draining -> stopped (what /readyz reports).
        self.phase = "starting"
        self.registry = make_registry(self.runtime, lambda: self.loop_lag)
        #: How late the event loop last ran a timer, in seconds.
        self.loop_lag = 0.0
        #: Every open WebSocket connection (for dead-peer pings and shutdown).
        self.connections: set[Connection] = set()
        self._application = make_application(
            self.runtime,
            max_message_size=settings.max_message_size,
            registry=self.connections,
            max_connections=settings.max_connections,
            allowed_origins=settings.allowed_origins,
        )
        self._http: tornado.httpserver.HTTPServer | None = None
        self._admin: tornado.httpserver.HTTPServer | None = None
        self._sweeper = Sweeper(self.runtime)
        self._periodic: list[PeriodicCallback] = []
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
            self._admin = tornado.httpserver.HTTPServer(tornado.web.Application(handlers))
            self._admin.add_sockets(admin_sockets)
            self.admin_addresses = [s.getsockname()[:2] for s in admin_sockets]
        await self.runtime.start()
        sockets = tornado.netutil.bind_sockets(self.settings.port, self.settings.host)
        self._http = tornado.httpserver.HTTPServer(
            self._application,
            max_body_size=max(self.settings.max_message_size, 64 * 1024),
            max_header_size=MAX_HEADER_BYTES,
            # Tornado's header timeout: a client that dribbles its request is cut (slowloris).
            idle_connection_timeout=self.settings.handshake_timeout,
            body_timeout=BODY_TIMEOUT,
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
        self.phase = "ready"
        self.notifier.ready()
        self._report_status()
        return self.addresses

    def _watchdog(self) -> None:
        self.notifier.watchdog()

    def _start_periodic(self, fn: Callable[[], None], seconds: float) -> None:
        callback = PeriodicCallback(fn, seconds * 1000)
        callback.start()
        self._periodic.append(callback)

    def _ping_peers(self) -> None:
        """Ping peers that have been silent for --ping-interval; cut those that never answered.

        One pass over the open connections instead of one timer per socket.
        """
        now = asyncio.get_running_loop().time()
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        dead = 0
        for conn in list(self.connections):
            if conn.ping_sent_at is not None:
                if now - conn.ping_sent_at > timeout:
                    conn.abort()
                    dead += 1
            elif now - conn.last_seen > interval:
                conn.ping(now)
        if dead:
            self.runtime.counters["dead_peers"] += dead
            log.info("cut %d WebSocket peers that did not answer a ping within %gs", dead, timeout)

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

    def describe_objects(self, limit: int, state: str | None) -> dict[str, Any]:
        """What /objects shows: each object's id, class, state, sockets, idle time and blocker."""
        now = self.runtime.clock()
        hosts = [h for h in self.runtime.hosts() if state is None or h.lifecycle.state.value == state]
        listed = []
        for host in hosts[:limit]:
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
        return {"count": len(hosts), "shown": len(listed), "objects": listed}

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
        if self._admin is not None:
            self._admin.stop()
            await self._admin.close_all_connections()
        self.phase = "stopped"
