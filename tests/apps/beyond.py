"""A test application for what wsecho gives beyond Cloudflare's hibernation API: tags that
change, several and binary auto-responses, per-handler idle control and counting.

``/<room>/ws?tags=a,b`` joins room ``<room>`` of ``env.ROOMS``. A text message is a JSON
command ``{"op": ..., ...}`` answered with ``{"ok": result}`` or
``{"error": "<ExceptionType>: message"}`` (anything else is echoed after ``handler:``); ``op`` names a method of the object below
(``op_<name>``), and ``ws`` is the sender. Everything an object sees goes to ``env.REC``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

from wsecho import App, DurableObject, ReadyState, Response, WebSocketPair, WebSocketRequestResponsePair


def _pair(raw):
    """A pair from JSON: ``["ping", "pong"]``, or ``{"hex": ["c000", "d000"]}`` for a binary one."""
    if isinstance(raw, dict):
        request, response = raw["hex"]
        return WebSocketRequestResponsePair(bytes.fromhex(request), bytes.fromhex(response))
    return WebSocketRequestResponsePair(*raw)


def _shown(pair):
    if pair is None:
        return None
    return [x.hex() if isinstance(x, bytes) else x for x in (pair.request, pair.response)]


class BeyondRoom(DurableObject):
    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        self.rec = env.REC
        self.rec.record("constructor", ctx.id.name)
        # The pairs a fresh instance sets (env.FLAGS["pairs"]): none unless a test asks.
        pairs = env.FLAGS.get("pairs")
        if pairs is not None:
            ctx.set_web_socket_auto_responses([_pair(p) for p in pairs])

    async def fetch(self, request):
        query = parse_qs(urlsplit(request.url).query)
        tags = [t for t in query.get("tags", [""])[0].split(",") if t]
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server, tags)
        return Response(status=101, web_socket=client)

    def web_socket_message(self, ws, message):
        if isinstance(message, bytes) or not message.startswith("{"):
            self.rec.record("message", message)  # not a command: the handler echoes it
            ws.send((b"handler:" if isinstance(message, bytes) else "handler:") + message)
            return
        cmd = json.loads(message)
        try:
            result = getattr(self, "op_" + cmd.pop("op"))(ws, **cmd)
        except Exception as exc:
            ws.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        else:
            ws.send(json.dumps({"ok": result}))

    def web_socket_close(self, ws, code, reason, was_clean):
        self.rec.record("close", code)

    # -- tags --------------------------------------------------------------------------

    def op_tags(self, ws):
        return self.ctx.get_tags(ws)

    def op_set_tags(self, ws, tags):
        return self.ctx.set_tags(ws, tags)

    def op_add_tag(self, ws, tag):
        return self.ctx.add_tag(ws, tag)

    def op_remove_tag(self, ws, tag):
        return self.ctx.remove_tag(ws, tag)

    def op_members(self, ws, tag=None):
        """The tags of each socket with ``tag`` (an order the index keeps)."""
        return [self.ctx.get_tags(s) for s in self.ctx.get_web_sockets(tag)]

    def op_broadcast(self, ws, text, tag=None):
        return self.ctx.broadcast(text, tag=tag)

    # -- auto-responses ------------------------------------------------------------------

    def op_set_pairs(self, ws, pairs):
        return self.ctx.set_web_socket_auto_responses([_pair(p) for p in pairs])

    def op_set_pair(self, ws, pair=None):
        return self.ctx.set_web_socket_auto_response(None if pair is None else _pair(pair))

    def op_pairs(self, ws):
        return {
            "all": [_shown(p) for p in self.ctx.get_web_socket_auto_responses()],
            "one": _shown(self.ctx.get_web_socket_auto_response()),
        }

    def op_stamp(self, ws, request=None, hex=None):
        if hex is not None:
            request = bytes.fromhex(hex)
        stamp = self.ctx.get_web_socket_auto_response_timestamp(ws, request)
        return None if stamp is None else stamp.isoformat()

    # -- idle control ----------------------------------------------------------------------

    def op_hibernate_now(self, ws):
        return self.ctx.hibernate_now()

    def op_hibernate_soon(self, ws):
        """hibernate_now() from outside any event: a callback after this turn."""
        asyncio.get_running_loop().call_soon(self.ctx.hibernate_now)

    def op_keep_awake_until(self, ws, iso=None, raw=None):
        """``iso``: an aware datetime; ``raw``: the value itself (epoch ms, or something wrong)."""
        return self.ctx.keep_awake_until(datetime.fromisoformat(iso) if iso is not None else raw)

    # -- counting ------------------------------------------------------------------------

    def op_count(self, ws, tag=None, state=None):
        return self.ctx.count_web_sockets(tag, state=state)  # an int: ReadyState is an IntEnum

    def op_close_tagged(self, ws, tag, keep):
        """Close the sockets with ``tag`` whose tags are not ``keep``, then count in the same turn."""
        ctx = self.ctx
        for other in ctx.get_web_sockets(tag):
            if ctx.get_tags(other) != keep:
                other.close(4000, "closed by the room")
        return {
            "closing": ctx.count_web_sockets(state=ReadyState.CLOSING),
            "open": ctx.count_web_sockets(state=ReadyState.OPEN),
            "open blue": ctx.count_web_sockets("blue", state=ReadyState.OPEN),
            "listed closing": len(ctx.get_web_sockets(state=ReadyState.CLOSING)),
            "all": ctx.count_web_sockets(),
        }

    def op_listed(self, ws, tag=None, state=None):
        return len(self.ctx.get_web_sockets(tag, state=state))


async def beyond_worker(request, env):
    room = urlsplit(request.url).path.split("/")[1]
    return await env.ROOMS.get_by_name(room).fetch(request)


def beyond_app(recorder, flags):
    """``flags`` is shared: a test may change it while the server runs."""
    return App(fetch=beyond_worker, bindings={"ROOMS": BeyondRoom}, vars={"REC": recorder, "FLAGS": flags})
