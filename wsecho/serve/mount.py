"""Hibernating objects inside any Tornado application: a real ``WebSocketHandler`` per socket.

:class:`Mount` serves a wsecho :class:`~wsecho.api.app.App` under a path prefix of the user's
own ``tornado.web.Application``, on the user's IOLoop and HTTPServer. Every request under the
prefix goes to the app's ``fetch``; when an object accepts a WebSocket, the same request is
upgraded by :class:`ObjectHandler`, a ``tornado.websocket.WebSocketHandler`` whose events
go into the runtime and its state machines exactly as the standalone server's do: hibernation
with the socket kept open, tags, attachments, auto-response, the closing rules (the peer's
Close is answered with the object's code and reason), storage, alarms.

This path uses Tornado's own framing (``WebSocketProtocol13``) over its IOStream, so it runs
at Tornado's speed; ``python -m wsecho`` takes the socket away from Tornado after the
handshake instead (see docs/decisions/0003).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from http.client import responses as HTTP_REASONS  # noqa: N812 - a constant
from typing import TYPE_CHECKING, Any

import tornado.iostream
import tornado.web
import tornado.websocket

from wsecho.api.http import Headers, Request, Response
from wsecho.api.websocket import SocketLink, accepted_peer
from wsecho.core import frames
from wsecho.core.fanout import FanoutPolicy, Overflow
from wsecho.core.handshake import HANDSHAKE_HEADERS, handshake_problem
from wsecho.core.limits import Limits
from wsecho.core.memory import Mark
from wsecho.runtime.runtime import Runtime
from wsecho.serve.config import memory_mark
from wsecho.serve.connection import CutLog
from wsecho.serve.gateway import CLIENT_ADDRESS_HEADER, log_unaccepted_101
from wsecho.serve.memory import memory_guard
from wsecho.serve.outbound import Dialer
from wsecho.serve.server import Sweeper, backend_for, utc_now
from wsecho.serve.takeover import peer_close_protocol, queued_bytes

if TYPE_CHECKING:
    from wsecho.api.app import App
    from wsecho.backends.base import Backend
    from wsecho.core.fanout import Fanout

log = logging.getLogger(__name__)


class Mount:
    """A wsecho app served under ``prefix`` of your Tornado application.

    ::

        rooms = wsecho.tornado.Mount(app, prefix="/rooms/", data_dir="rooms-data")
        application = tornado.web.Application([(r"/api/.*", MyHandler), *rooms.routes()])
        await rooms.start()    # storage, alarms, the hibernation sweep
        ...
        await rooms.stop()     # Close 1001 to every socket, commit, close storage
    """

    def __init__(
        self,
        app: App,
        prefix: str = "/",
        *,
        data_dir: str = "wsecho-data",
        hibernate_after: float = 10.0,
        limits: Limits | None = None,
        backend: Backend | None = None,
        runtime: Runtime | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        sweeper: bool = True,
        max_active_objects: int = 0,
        memory_high: str = "80%",
        memory_low: str = "70%",
    ) -> None:
        if not prefix.startswith("/"):
            msg = f"Mount(prefix=...) must start with '/', got {prefix!r}"
            raise ValueError(msg)
        self.prefix = prefix
        self.runtime = runtime or Runtime(
            app,
            clock=clock,
            wall_clock=wall_clock,
            hibernate_after=hibernate_after,
            limits=limits,
            backend=backend if backend is not None else backend_for(data_dir),
            max_active_objects=max_active_objects,
        )
        if self.runtime.dialer is None:
            self.runtime.set_dialer(Dialer(self.runtime))
        # The same bounds as the standalone server's --memory-high and --memory-low (decision 0010).
        #: Memory-pressure eviction (None: memory_high="off"); the sweep checks it.
        self.memory = memory_guard(self.runtime, _mark("memory_high", memory_high), _mark("memory_low", memory_low))
        self._sweeper = Sweeper(self.runtime, self.memory) if sweeper else None
        #: Warnings about sockets a broadcast closed for reading too slowly, rate-limited.
        self.cut_log = CutLog()

    def routes(self) -> list[tuple[str, type[ObjectHandler], dict[str, Any]]]:
        """The routes to put in your ``tornado.web.Application``: everything under the prefix."""
        return [(re.escape(self.prefix) + ".*", ObjectHandler, {"mount": self})]

    async def start(self) -> None:
        """Open storage, schedule the stored alarms and start the hibernation sweep."""
        await self.runtime.start()
        if self._sweeper is not None:
            self._sweeper.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Close every WebSocket with 1001, wait (at most ``timeout``) for the peers to answer,
        then commit every pending write and close storage."""
        if self._sweeper is not None:
            self._sweeper.stop()
        self.runtime.close_all(1001, "Going Away")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.runtime.socket_count() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.runtime.close()


def _mark(name: str, text: str) -> Mark | None:
    try:
        return memory_mark(text)
    except ValueError as exc:
        msg = f"Mount({name}=...) {exc}"
        raise ValueError(msg) from None


def routes(mount: Mount) -> list[tuple[str, type[ObjectHandler], dict[str, Any]]]:
    """``mount.routes()``, for the ``[*wsecho.tornado.routes(mount), ...]`` spelling."""
    return mount.routes()


class ObjectHandler(tornado.websocket.WebSocketHandler):
    """Every request under a :class:`Mount`'s prefix: the app's ``fetch`` first; on its 101,
    Tornado's WebSocket handshake and frames, with the events going into the runtime."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    mount: Mount
    runtime: Runtime
    link: SocketLink | None
    opened: bool
    peer_closed: bool
    chosen_protocol: str | None
    #: Why the connection was failed because of the peer (1002, 1007, 1009), for web_socket_error.
    failure: tuple[int, str] | None
    #: Whether the object (or the runtime for it) sent the Close: a 1009 then is the object's.
    object_closed: bool
    plain_frames: bool

    def initialize(self, mount: Mount) -> None:
        self.mount = mount
        self.runtime = mount.runtime
        self.link = None
        self.opened = False
        self.peer_closed = False
        self.chosen_protocol = None
        self.failure = None
        self.object_closed = False

    # -- plain HTTP ------------------------------------------------------------------------

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            await self._serve()
            return
        response = await self._fetch()
        if response is None:
            return
        if response.status != 101:
            self._respond(response)
            return
        link = accepted_peer(response.web_socket) if response.web_socket is not None else None
        if link is None:
            log_unaccepted_101(self.request.path)
            self._plain(500, "Internal Server Error")
            return
        problem = handshake_problem(self.request.method or "", self.request.version, self.request.headers)
        if problem is not None:  # the same answers as the standalone server's
            status, text = problem
            self._plain(status, text, [("Sec-WebSocket-Version", "13")] if status == 426 else [])
            self.mount.runtime.handshake_failed(link)
            return
        self.link = link
        self.chosen_protocol = response.headers.get("Sec-WebSocket-Protocol")
        for name, value in response.headers.items():
            if name.lower() not in HANDSHAKE_HEADERS:
                self.add_header(name, value)
        try:
            await super().get(*args, **kwargs)  # the handshake, then the frames until the end
        finally:
            if not self.opened:
                self.mount.runtime.handshake_failed(link)

    async def head(self, *args: Any) -> None:
        await self._serve()

    async def post(self, *args: Any) -> None:
        await self._serve()

    async def put(self, *args: Any) -> None:
        await self._serve()

    async def patch(self, *args: Any) -> None:
        await self._serve()

    async def delete(self, *args: Any) -> None:
        await self._serve()

    async def options(self, *args: Any) -> None:
        await self._serve()

    async def _serve(self) -> None:
        response = await self._fetch()
        if response is None:
            return
        if response.status == 101:
            link = accepted_peer(response.web_socket) if response.web_socket is not None else None
            if link is not None:
                self.mount.runtime.handshake_failed(link)
            self._plain(400, 'Bad WebSocket handshake: the "Upgrade" header must be "websocket"')
            return
        self._respond(response)

    async def _fetch(self) -> Response | None:
        req = self.request
        headers = Headers(req.headers.get_all())
        # Cloudflare's header for the client's address (Tornado's remote_ip honours
        # X-Forwarded-For when the application runs with xheaders=True).
        headers.set(CLIENT_ADDRESS_HEADER, req.remote_ip or "")
        request = Request(url=req.full_url(), method=req.method or "GET", headers=headers, body=req.body)
        try:
            return await self.mount.runtime.fetch(request)
        except Exception:
            log.exception("the worker's fetch() raised for %s %s", req.method, req.path)
            self._plain(500, "Internal Server Error")
            return None

    def _respond(self, response: Response) -> None:
        self.clear()
        self.clear_header("Content-Type")  # Tornado's default; the application sets its own
        self.set_status(response.status, HTTP_REASONS.get(response.status, "Unknown"))
        for name, value in response.headers.items():
            self.add_header(name, value)
        self.finish(response.body or b"")

    def _plain(self, status: int, text: str, extra: list[tuple[str, str]] | None = None) -> None:
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "text/plain;charset=UTF-8")
        for name, value in extra or ():
            self.set_header(name, value)
        self.finish(text)

    # -- the WebSocket -----------------------------------------------------------------------

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        return peer_close_protocol(self)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Like Cloudflare: the application picks by setting the header on its 101 Response.
        return self.chosen_protocol if self.chosen_protocol in subprotocols else None

    def open(self, *args: Any, **kwargs: Any) -> None:
        assert self.link is not None
        self.opened = True
        #: Uncompressed: messages go onto the stream as frames of our own (see send_message).
        self.plain_frames = self.get_compression_options() is None
        self.mount.runtime.socket_opened(self.link, self, self.request.full_url(), self.selected_subprotocol, "")

    def on_message(self, message: str | bytes) -> asyncio.Future[None] | None:
        # A future means the object's queue is long: Tornado reads nothing more until it resolves.
        return self.runtime.message_received(self.link, message)  # type: ignore[arg-type]  # set in get()

    def on_peer_close(self, code: int | None, reason: str) -> None:
        assert self.link is not None
        self.peer_closed = True
        self.mount.runtime.peer_closed(self.link, code, reason)

    def on_failure(self, code: int, reason: str) -> None:
        if self.failure is None and not self.object_closed:
            self.failure = (code, reason)

    def on_close(self) -> None:
        if not self.opened or self.peer_closed or self.link is None:
            return
        if self.failure is not None:
            self.mount.runtime.socket_failed(self.link, *self.failure)
        else:
            self.mount.runtime.transport_lost(self.link)

    # -- wsecho.api.websocket.Transport --------------------------------------------------------

    def send_message(self, message: str | bytes) -> None:
        conn = self.ws_connection
        if conn is None:
            return  # the peer is gone; on_close reports it
        if not self.plain_frames:  # compressed: Tornado's own framing
            with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                self.write_message(message, binary=isinstance(message, bytes))
            return
        # The frame straight onto the stream: write_message() wraps every message in a task
        # (about a fifth of this path's time, measured with scripts/bench echo_mounted_100x32).
        frame = frames.message_frame(message)
        stream = conn.stream
        if stream is None:
            return
        try:
            stream.write(frame)
        except tornado.iostream.StreamClosedError:
            return  # the peer left meanwhile; on_close reports it

    def send_close(self, code: int | None, reason: str) -> None:
        self.object_closed = True
        self.close(code, reason or None)

    def send_fanout(self, fanout: Fanout) -> bool:
        conn = self.ws_connection
        stream = conn.stream if conn is not None else None
        if stream is None or stream.closed():
            return False  # the peer is gone; on_close reports it
        frame = fanout.frame if self.plain_frames else None
        policy = fanout.policy
        size = len(frame) if frame is not None else len(fanout.message)
        if queued_bytes(stream) + size > policy.queue_bytes:
            self._fanout_overflow(stream, policy)
            return False
        if frame is None:
            # Compressed: Tornado's framing, whose compressor may keep its context per socket.
            try:
                self.write_message(fanout.message, binary=isinstance(fanout.message, bytes))
            except tornado.websocket.WebSocketClosedError:
                return False
            return True
        try:
            stream.write(frame)
        except tornado.iostream.StreamClosedError:
            return False
        return True

    def _fanout_overflow(self, stream: tornado.iostream.IOStream, policy: FanoutPolicy) -> None:
        stats = self.runtime.stats
        if policy.overflow is Overflow.DROP:
            stats.fanout_dropped += 1
            return
        stats.fanout_closed += 1
        reason = (
            f"the peer read too slowly for a broadcast (over its fan-out limit of {policy.queue_bytes} "
            "bytes queued: fanout_queue_bytes)"
        )
        self.failure = (1008, reason)  # on_close reports it as web_socket_error(1008)
        self.mount.cut_log.warn(self.link.ws.url if self.link is not None else None, reason)
        stream.close()  # at once: its queue is what is too long, a Close frame would wait behind it
