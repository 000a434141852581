"""The application's HTTP side: every request goes to the worker; on its 101, the handshake
is checked and answered and the socket handed to a Connection on the loop's transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from http.client import responses as HTTP_REASONS  # noqa: N812 - a constant
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.tcpserver
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPConnection
from tornado.iostream import SSLIOStream, StreamClosedError
from tornado.log import access_log

from wsecho.api.http import TEXT_PLAIN, Headers, Request, Response
from wsecho.api.websocket import accepted_peer
from wsecho.core import deflate
from wsecho.core.errors import BadRequestError, InvalidArgumentError, NotOwnerError
from wsecho.core.forwarded import TrustedProxies
from wsecho.core.handshake import HANDSHAKE_HEADERS, accept_value, handshake_problem
from wsecho.core.target import AllowedHosts, Target, resolve
from wsecho.runtime.runtime import Runtime
from wsecho.serve.config import Settings
from wsecho.serve.connection import Connection, ConnectionSettings, DeflateConnection
from wsecho.serve.mesh import (
    CLIENT_REQUEST,
    HANDED_OVER_FROM,
    UPGRADING,
    HandOver,
    MeshClient,
    RoutingError,
    WorkerUnavailableError,
)
from wsecho.serve.outbound import Dialer
from wsecho.serve.peers import PREFIX as PEER_PREFIX
from wsecho.serve.peers import PeerHandler
from wsecho.serve.takeover import take_socket, take_tls_socket
from wsecho.serve.tls import TLSTransport

if TYPE_CHECKING:
    from wsecho.api.websocket import SocketLink

log = logging.getLogger(__name__)


#: Bytes queued for a peer that does not read before its connection is cut (close code 1008).
MAX_OUTGOING_BYTES = 16 * 1024 * 1024
#: Bytes queued for all slow peers together before the worst are cut (--max-outgoing-total).
MAX_OUTGOING_TOTAL_BYTES = Settings().max_outgoing_total
#: How long the server waits for the peer's answer to its Close before cutting the connection.
CLOSE_TIMEOUT = 5.0
#: The request header that carries the client's address, as on Cloudflare: the TCP peer, or
#: the address a trusted proxy forwarded (--forwarded-allow-ips).
CLIENT_ADDRESS_HEADER = "CF-Connecting-IP"
#: Request headers larger than this are refused (Tornado closes the connection).
MAX_HEADER_BYTES = 16 * 1024
#: A request body must arrive within this time.
BODY_TIMEOUT = 30.0
#: accept() errors that a pause cures: the process or the system ran out of descriptors,
#: or the kernel out of buffers. Retrying at once would fail again (the listener stays
#: readable), so the loop would spin.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self.runtime = runtime
        self.connections = connections
        self.registry = registry
        self.max_connections = max_connections
        self.allowed_origins = allowed_origins
        self.allowed_hosts = allowed_hosts
        self.max_body_memory = max_body_memory
        #: The proxies whose X-Forwarded-For and X-Forwarded-Proto count (--forwarded-allow-ips).
        self.trusted_proxies = trusted_proxies if trusted_proxies is not None else TrustedProxies()
        #: Upgrades between their admission and their connection's registration: they hold
        #: a WebSocket slot, so concurrent upgrades cannot overshoot --max-connections.
        self.upgrading = 0
        #: Bytes of request bodies held (or reserved from Content-Length) right now.
        self.body_bytes = 0
        #: Connections and requests turned away, by reason (exported on /metrics).
        self.refused: Counter[str] = Counter()
        #: With --workers: the other workers, for handing over connections (None: one process).
        self.mesh: MeshClient | None = None
        #: On a cluster member: answers the calls of the other members (wsecho.serve.peers).
        self.peers: PeerHandler | None = None
        #: Called with a request for an object another cluster member serves, and its id.
        self.misrouted: Callable[[Request, str], None] | None = None
        #: Connections handed to another worker, and received from one.
        self.handed_over = 0
        self.adopted = 0

    def start_request(self, server_conn: object, request_conn: HTTPConnection) -> Exchange:
        return Exchange(self, cast(HTTP1Connection, request_conn))

    def websockets(self) -> int:
        """Open WebSocket connections plus upgrades holding a slot."""
        return len(self.registry) + self.upgrading

    def refuse_over_http_limit(self, delegate: tornado.httputil.HTTPMessageDelegate, limit: int) -> None:
        if isinstance(delegate, Exchange):
            delegate.refusal = (
                503,
                f"The server is at its limit of {limit} HTTP connections (--max-http-connections); try again later",
            )

    def take_slot(self) -> bool:
        """Reserve a WebSocket connection slot for an upgrade, before anything awaits."""
        if self.max_connections and self.websockets() >= self.max_connections:
            self.refused["websocket_limit"] += 1
            return False
        self.upgrading += 1
        return True

    def connection(
        self, server: SocketLink, leftover: bytes, url: str, protocol: str | None, accepted: tuple[str, int] | None
    ) -> Connection:
        """The connection for the socket: compressing when permessage-deflate was agreed."""
        settings, registry = self.connections, self.registry
        if accepted is None:
            return Connection(server, settings, leftover, registry, url=url, protocol=protocol)
        return DeflateConnection(
            server,
            settings,
            leftover,
            registry,
            url=url,
            protocol=protocol,
            extensions=accepted[0],
            window_bits=accepted[1],
        )

    async def serve_socket(
        self,
        sock: socket.socket,
        server: SocketLink,
        leftover: bytes,
        url: str,
        protocol: str | None,
        accepted: tuple[str, int] | None,
    ) -> None:
        """Serve the frames of an upgraded plain socket on the loop's transport."""
        connection = self.connection(server, leftover, url, protocol, accepted)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock=sock)
        except OSError:
            sock.close()
            self.runtime.handshake_failed(server)

    async def adopt(self, sock: socket.socket, meta: dict[str, Any]) -> None:
        """Serve a connection another worker handed over (``--workers``): run the request it
        read through the application again, here where the object lives, and answer on the socket."""
        self.adopted += 1
        headers = tornado.httputil.HTTPHeaders()
        for name, value in meta["headers"]:
            headers.add(name, value)
        method, path, version = meta["method"], meta["path"], meta["version"]
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        async def answer(status: int, out: Iterable[tuple[str, str]], body: bytes) -> None:
            _access_log(status, method, path, meta["client"], started)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, raw_response(status, out, body, head=method == "HEAD"))
            sock.close()

        if not self.take_slot():
            limit = self.max_connections
            text = f"The server is at its limit of {limit} WebSocket connections; try again later"
            await answer(503, PLAIN, text.encode())
            return
        try:
            request = Request(url=meta["url"], method=method, headers=Headers(meta["headers"]), body=meta["body"])
            HANDED_OVER_FROM.set(meta["from"])
            UPGRADING.set(True)
            try:
                response = await self.runtime.fetch(request)
            except (WorkerUnavailableError, NotOwnerError) as exc:
                await answer(503, [*PLAIN, ("Retry-After", "1")], str(exc).encode())
                return
            except (Exception, HandOver) as exc:
                if isinstance(exc, RoutingError | HandOver):
                    log.error("%s %s: %s", method, path, exc if isinstance(exc, RoutingError) else "routed twice")
                else:
                    log.exception("the worker's fetch() raised for %s %s", method, path)
                await answer(500, PLAIN, b"Internal Server Error")
                return
            if response.status != 101:
                await answer(response.status, response.headers.items(), response.body or b"")
                return
            assert response.web_socket is not None
            server = accepted_peer(response.web_socket)
            if server is None:
                log_unaccepted_101(path)
                await answer(500, PLAIN, b"Internal Server Error")
                return
            problem = handshake_problem(method, version, headers)
            if problem is not None:
                status, text = problem
                extra = [("Sec-WebSocket-Version", "13")] if status == 426 else []
                await answer(status, [*PLAIN, *extra], text.encode())
                self.runtime.handshake_failed(server)
                return
            head, protocol, accepted = handshake_head(headers, response, self.connections.compression)
            _access_log(101, method, path, meta["client"], started)
            try:
                await loop.sock_sendall(sock, head)
            except OSError:
                sock.close()
                self.runtime.handshake_failed(server)
                return
            await self.serve_socket(sock, server, meta["leftover"], request.url, protocol, accepted)
        finally:
            self.upgrading -= 1

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
        """``request.url``: the connection's scheme (or a trusted proxy's X-Forwarded-Proto; not one a
        client claims), the authority, the path."""
        assert self.target is not None
        return f"{self.client()[1]}://{self.target.authority}{self.target.path}"

    def client(self) -> tuple[str, str]:
        """The client's address and scheme: the TCP peer's, or what a trusted proxy forwarded."""
        context = self.conn.context
        peer: str = getattr(context, "remote_ip", "") or ""
        scheme: str = getattr(context, "protocol", "http")
        proxies = self.gateway.trusted_proxies
        if not proxies or self.headers is None:
            return peer, scheme
        forwarded_for = self.headers.get_list("X-Forwarded-For")
        return proxies.client(peer, forwarded_for, self.headers.get_list("X-Forwarded-Proto"), scheme)

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
        if gateway.peers is not None and start_line.path.startswith(PEER_PREFIX):
            # Another member's call: before the Host check (it names this member's address).
            status, body = await gateway.peers(start_line.path, headers, b"".join(self.body), self.client()[0])
            self._respond(status, [("Content-Type", "application/octet-stream")], body)
            return
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
        # per client; it replaces whatever the client sent, which anyone could forge (and
        # X-Forwarded-For counts only from a proxy in --forwarded-allow-ips).
        request.headers.set(CLIENT_ADDRESS_HEADER, self.client()[0])
        if gateway.mesh is not None and self.slot:
            UPGRADING.set(True)  # this task's context: a stub fetch to another worker hands over
        # Only while fetch() runs: a WebSocket's reader callbacks copy this context, and the
        # request would stay alive for as long as the socket is open.
        passing_on = CLIENT_REQUEST.set(request)
        try:
            response = await gateway.runtime.fetch(request)
        except HandOver as move:
            await self._hand_over(move.owner, request)
            return
        except (WorkerUnavailableError, NotOwnerError) as exc:
            if isinstance(exc, NotOwnerError) and gateway.misrouted is not None:
                gateway.misrouted(request, exc.hex_id)  # e.g. teach the load balancer the owner
            self._plain(503, str(exc), [("Retry-After", "1")])
            return
        except Exception:
            log.exception("the worker's fetch() raised for %s %s", start_line.method, start_line.path)
            self._plain(500, "Internal Server Error")
            return
        finally:
            CLIENT_REQUEST.reset(passing_on)
        if response.status != 101:
            self._respond(response.status, response.headers.items(), response.body or b"")
            return
        assert response.web_socket is not None
        server = accepted_peer(response.web_socket)
        if server is None:
            log_unaccepted_101(start_line.path)
            self._plain(500, "Internal Server Error")
            return
        problem = handshake_problem(start_line.method, start_line.version, headers)
        if problem is not None:
            status, text = problem
            extra = [("Sec-WebSocket-Version", "13")] if status == 426 else []
            self._plain(status, text, extra)
            gateway.runtime.handshake_failed(server)
            return
        await self._upgrade(server, response, request.url)

    async def _hand_over(self, owner: int, request: Request) -> None:
        """Move the client's connection to worker ``owner``, with the request and the bytes
        read past it; that worker answers it (``Gateway.adopt``)."""
        mesh = self.gateway.mesh
        assert mesh is not None
        assert self.start_line is not None
        stream = self.conn.detach()
        try:
            taken = take_socket(stream)
        except OSError:  # the client left
            stream.close()
            return
        meta = {
            "method": self.start_line.method,
            "path": self.start_line.path,
            "version": self.start_line.version,
            "url": request.url,
            "headers": list(request.headers.items()),
            "body": request.body,
            "leftover": taken.leftover,
            "client": self.client()[0],
            "from": mesh.index,
        }
        try:
            await mesh.hand_over(owner, taken.sock, meta)
        except (WorkerUnavailableError, InvalidArgumentError) as exc:
            status = 503 if isinstance(exc, WorkerUnavailableError) else 431
            log.warning("%s %s: cannot hand the connection to worker %d: %s", meta["method"], meta["path"], owner, exc)
            with contextlib.suppress(OSError):
                taken.sock.setblocking(True)
                taken.sock.settimeout(1.0)
                taken.sock.sendall(raw_response(status, [*PLAIN, ("Retry-After", "1")], str(exc).encode()))
        else:
            self.gateway.handed_over += 1
        taken.sock.close()  # ours; the owner received its own descriptor

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

    async def _upgrade(self, server: SocketLink, response: Response, url: str) -> None:
        headers = self.headers
        assert headers is not None
        head, protocol, accepted = handshake_head(headers, response, self.gateway.connections.compression)
        self._log(101)
        stream = self.conn.detach()
        try:
            await stream.write(head)
        except StreamClosedError:
            self.gateway.runtime.handshake_failed(server)
            return
        if isinstance(stream, SSLIOStream):
            self._serve_tls(stream, server, url, protocol, accepted)
            return
        try:
            taken = take_socket(stream)
        except OSError:  # the client left between the 101 and now (a Tornado change raises)
            stream.close()
            self.gateway.runtime.handshake_failed(server)
            return
        await self.gateway.serve_socket(taken.sock, server, taken.leftover, url, protocol, accepted)

    def _serve_tls(
        self,
        stream: SSLIOStream,
        server: SocketLink,
        url: str,
        protocol: str | None,
        accepted: tuple[str, int] | None,
    ) -> None:
        """Serve the frames over the SSLSocket Tornado negotiated (see wsecho.serve.tls)."""
        sock, leftover = take_tls_socket(stream)
        connection = self.gateway.connection(server, leftover, url, protocol, accepted)
        try:
            TLSTransport(sock, connection, asyncio.get_running_loop())
        except OSError:  # the client left between the 101 and now
            sock.close()
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
        assert self.start_line is not None
        _access_log(status, self.start_line.method, self.start_line.path, self.client()[0], self.started)


#: A plain-text answer's headers.
PLAIN = (("Content-Type", TEXT_PLAIN),)


def handshake_head(
    headers: tornado.httputil.HTTPHeaders, response: Response, compression: bool
) -> tuple[bytes, str | None, tuple[str, int] | None]:
    """The 101 response for the application's ``response`` to the upgrade request ``headers``:
    its bytes, the chosen subprotocol, and the agreed permessage-deflate (header, window bits)."""
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
    # permessage-deflate: --compression decides, unless the application's 101 names the
    # extensions it wants (like the subprotocol): without permessage-deflate there, none.
    wanted = response.headers.get("Sec-WebSocket-Extensions")
    compress = compression if wanted is None else "permessage-deflate" in wanted.lower()
    accepted = deflate.negotiate(",".join(headers.get_list("Sec-WebSocket-Extensions"))) if compress else None
    if accepted is not None:
        lines.append(f"Sec-WebSocket-Extensions: {accepted[0]}")
    lines.extend(_safe_headers(response.headers.items(), skip=HANDSHAKE_HEADERS))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace"), protocol, accepted


def _safe_headers(items: Iterable[tuple[str, str]], skip: Iterable[str] = ()) -> list[str]:
    """``name: value`` lines, without the ``skip`` names and without any header holding a line break."""
    lines = []
    for name, value in items:
        if name.lower() in skip:
            continue
        if any(c in name + value for c in "\r\n\0"):
            log.error("dropped response header %r: it contains a line break", name)
            continue
        lines.append(f"{name}: {value}")
    return lines


def raw_response(status: int, headers: Iterable[tuple[str, str]], body: bytes, *, head: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for a socket Tornado does not serve."""
    lines = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Unknown')}"]
    lines.extend(_safe_headers(headers, skip=("content-length", "connection")))
    lines.append(f"Date: {tornado.httputil.format_timestamp(time.time())}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace") + (b"" if head else body)


def _access_log(status: int, method: str, path: str, remote: str, started: float) -> None:
    """Tornado's access-log line on Tornado's access logger (--access-log off silences it)."""
    if not access_log.isEnabledFor(logging.INFO) or access_log.disabled:
        return
    level = access_log.info if status < 400 else access_log.warning if status < 500 else access_log.error
    elapsed = (time.monotonic() - started) * 1000
    level("%d %s %s (%s) %.2fms", status, method, path, remote or "?", elapsed)


def _log_crash(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a request failed inside the gateway", exc_info=task.exception())


def log_unaccepted_101(path: str) -> None:
    """The application answered 101 without an object accepting the pair's server end."""
    log.error(
        "fetch() answered 101 for %s but no object accepted the server end of its "
        "WebSocketPair (call ctx.accept_web_socket(server))",
        path,
    )


def make_application(
    runtime: Runtime,
    *,
    max_message_size: int,
    registry: set[Connection] | None = None,
    max_connections: int = 0,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: AllowedHosts | None = None,
    max_body_memory: int = 0,
    trusted_proxies: TrustedProxies | None = None,
    max_outgoing: int = MAX_OUTGOING_BYTES,
    max_outgoing_total: int = MAX_OUTGOING_TOTAL_BYTES,
    close_timeout: float = CLOSE_TIMEOUT,
    compression: bool = False,
) -> Gateway:
    """The application's HTTP side (for ``HTTPServer``); ``registry`` collects the open connections.

    ``allowed_hosts`` defaults to any host: only the caller knows the address it binds
    (:class:`Server` passes ``AllowedHosts.for_listener`` of its own).
    """
    if runtime.dialer is None:
        runtime.set_dialer(Dialer(runtime, max_message_size=max_message_size))
    connections = ConnectionSettings(
        runtime,
        max_message_size=max_message_size,
        max_outgoing=max_outgoing,
        max_outgoing_total=max_outgoing_total,
        close_timeout=close_timeout,
        compression=compression,
    )
    return Gateway(
        runtime,
        connections,
        registry if registry is not None else set(),
        max_connections,
        allowed_origins,
        allowed_hosts if allowed_hosts is not None else AllowedHosts(frozenset(), (), any=True),
        max_body_memory,
        trusted_proxies,
    )
