"""A test application for outbound WebSockets (``ctx.connect_web_socket``), and the upstream
server the tests run for it.

``/<name>/ws`` joins object ``<name>`` of ``env.RELAYS`` as a client (tag ``client``). A text
message from a client is a JSON command ``{"op": ..., ...}`` answered with ``{"ok": result}``
or ``{"error": "<ExceptionType>: message"}``. What the object's upstream sockets deliver
(messages, closes, errors) goes to ``env.REC``, with the instance that handled it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from wsecho import App, DurableObject, Response, WebSocketPair, WebSocketRequestResponsePair

#: Instances built so far: each records its serial (``id()`` of a freed instance may be reused).
BUILT = itertools.count(1)


class Relay(DurableObject):
    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        self.rec = env.REC
        self.serial = next(BUILT)
        self.rec.record("constructor", ctx.id.name)

    async def fetch(self, request):
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server, ["client"])
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        tags = self.ctx.get_tags(ws)
        if "client" not in tags:
            self.rec.record("upstream", message, tags, ws.deserialize_attachment(), self.serial)
            return
        cmd = json.loads(message)
        try:
            result = await getattr(self, "op_" + cmd.pop("op"))(**cmd)
        except Exception as exc:
            ws.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        else:
            ws.send(json.dumps({"ok": result}))

    def web_socket_close(self, ws, code, reason, was_clean):
        self.rec.record("close", self.ctx.get_tags(ws), code, reason, was_clean)

    def web_socket_error(self, ws, error):
        self.rec.record("error", self.ctx.get_tags(ws), str(error))

    async def op_connect(self, url, tags=("upstream",), attachment=None, protocols=(), headers=None):
        ws = await self.ctx.connect_web_socket(url, tags=tags, protocols=protocols, headers=headers)
        if attachment is not None:
            ws.serialize_attachment(attachment)
        return [ws.url, ws.protocol, int(ws.ready_state)]

    async def op_send(self, text, tag="upstream"):
        for ws in self.ctx.get_web_sockets(tag):
            ws.send(text)
        return self.ctx.count_web_sockets(tag)

    async def op_broadcast(self, text):
        return self.ctx.broadcast(text, tag="upstream")

    async def op_close(self, code=1000, reason="bye", tag="upstream"):
        for ws in self.ctx.get_web_sockets(tag):
            ws.close(code, reason)

    async def op_auto(self, request, response):
        self.ctx.set_web_socket_auto_response(WebSocketRequestResponsePair(request, response))

    async def op_count(self, tag="upstream"):
        return self.ctx.count_web_sockets(tag)


async def relay_worker(request, env):
    name = urlsplit(request.url).path.split("/")[1]
    return await env.RELAYS.get_by_name(name).fetch(request)


def relay_app(recorder):
    return App(fetch=relay_worker, bindings={"RELAYS": Relay}, vars={"REC": recorder})


# -- the upstream: a real WebSocket server of the test's own ------------------------------


class Upstream:
    """A Tornado WebSocket server on 127.0.0.1: ``/echo`` answers each message with
    ``echo:<message>``; ``/refuse`` answers the handshake with 403. The test reaches each
    connected peer (``peers``) to push messages or close it, and reads what it received."""

    def __init__(self, ssl_options=None) -> None:
        self.peers: list[UpstreamPeer] = []
        self.received: list[str | bytes] = []
        self.closed: list[tuple[int | None, str | None]] = []
        self.headers: list[dict[str, str]] = []
        #: Messages it takes without answering.
        self.quiet = {"quiet", "pong"}
        self._changed = asyncio.Event()
        app = tornado.web.Application(
            [(r"/echo", UpstreamPeer, {"upstream": self}), (r"/refuse", Refuse)],
        )
        sock = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)[0]
        self.port = sock.getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(app, ssl_options=ssl_options)
        self.server.add_sockets([sock])

    def url(self, path="/echo", scheme="ws"):
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def changed(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate, timeout=5.0):
        async with asyncio.timeout(timeout):
            while not (result := predicate()):
                self._changed.clear()
                await self._changed.wait()
        return result

    async def stop(self) -> None:
        self.server.stop()
        for peer in list(self.peers):
            peer.close(1001)
        await self.server.close_all_connections()


class UpstreamPeer(tornado.websocket.WebSocketHandler):
    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def select_subprotocol(self, subprotocols):
        return subprotocols[0] if subprotocols else None

    def open(self):
        self.upstream.headers.append(dict(self.request.headers))
        self.upstream.peers.append(self)
        self.upstream.changed()

    def on_message(self, message):
        self.upstream.received.append(message)
        self.upstream.changed()
        if message not in self.upstream.quiet:
            self.write_message(b"echo:" + message if isinstance(message, bytes) else "echo:" + message)

    def on_close(self):
        if self in self.upstream.peers:
            self.upstream.peers.remove(self)
        self.upstream.closed.append((self.close_code, self.close_reason))
        self.upstream.changed()


class Refuse(tornado.web.RequestHandler):
    def get(self):
        self.set_status(403)
        self.finish("no")
