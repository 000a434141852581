"""A test application that exercises the whole socket API through JSON commands.

Every WebSocket message is ``{"op": ..., ...}``; the object answers with
``{"ok": result}`` or ``{"error": "<ExceptionType>: message"}``. HTTP paths
``/lab/<name>/<what>`` pick the object; ``?tags=a,b``, ``?mode=accept`` and
``?extensions=`` shape the upgrade. Everything an object sees goes to ``env.REC``.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs, urlsplit

from wsecho import (
    App,
    DurableObject,
    Response,
    WebSocketPair,
    WebSocketRequestResponsePair,
)


def _answer(ws, fn):
    try:
        result = fn()
    except Exception as exc:
        ws.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    else:
        ws.send(json.dumps({"ok": result}))


class Lab(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.rec = env.REC
        self.flags = env.FLAGS
        self.loaded = None
        attachments = [ws.deserialize_attachment() for ws in ctx.get_web_sockets()]
        self.rec.record("constructor", ctx.id.name, attachments)
        if self.flags.get("auto_response"):
            ctx.set_web_socket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
        if self.flags.get("event_timeout"):
            ctx.set_hibernatable_web_socket_event_timeout(self.flags["event_timeout"])
        if self.flags.get("block"):
            ctx.block_concurrency_while(self._load)
        if self.flags.get("abort_in_constructor"):
            ctx.abort("not today")

    async def _load(self):
        await self.flags["gate"]
        if self.flags.get("block_raises"):
            raise RuntimeError("loading failed")
        self.loaded = "loaded"
        self.rec.record("loaded")

    async def fetch(self, request):
        url = urlsplit(request.url)
        query = parse_qs(url.query)
        if url.path.endswith("/ws"):
            client, server = WebSocketPair()
            if query.get("mode") == ["accept"]:
                server.accept()
            else:
                tags = query["tags"][0].split(",") if "tags" in query else []
                self.ctx.accept_web_socket(server, tags)
            # ?extensions=...: the 101 names the extensions the application wants (or none)
            headers = {"Sec-WebSocket-Extensions": query["extensions"][0]} if "extensions" in query else {}
            return Response(status=101, web_socket=client, headers=headers)
        if url.path.endswith("/count"):
            return Response(str(len(self.ctx.get_web_sockets(query.get("tag", [None])[0]))))
        return Response("lab")

    async def web_socket_message(self, ws, message):
        if isinstance(message, bytes):
            ws.send(b"binary:" + message)
            return
        if not message.startswith("{"):
            self.rec.record("message", message)
            ws.send(f"echo:{message}")
            return
        cmd = json.loads(message)
        op = cmd["op"]
        self.rec.record("op", op)
        ctx = self.ctx
        if op == "extensions":
            _answer(ws, lambda: ws.extensions)
        elif op == "broadcast":
            _answer(ws, lambda: ctx.broadcast(cmd["text"]))
        elif op == "tags":
            _answer(ws, lambda: ctx.get_tags(ws))
        elif op == "tagged":
            _answer(ws, lambda: len(ctx.get_web_sockets(cmd["tag"])))
        elif op == "set":
            _answer(ws, lambda: ws.serialize_attachment(cmd["value"]))
        elif op == "set_huge":
            _answer(ws, lambda: ws.serialize_attachment("x" * cmd["size"]))
        elif op == "set_bad":
            bad = {"set": {1, 2}, "bytes": b"x", "nan": float("nan"), "key": {1: "a"}}[cmd["kind"]]
            _answer(ws, lambda: ws.serialize_attachment(bad))
        elif op == "get":
            _answer(ws, ws.deserialize_attachment)
        elif op == "mutate":
            value = {"list": [1]}
            ws.serialize_attachment(value)
            value["list"].append(2)
            got = ws.deserialize_attachment()
            got["list"].append(3)
            _answer(ws, ws.deserialize_attachment)
        elif op == "auto":
            pair = ctx.get_web_socket_auto_response()
            stamp = ctx.get_web_socket_auto_response_timestamp(ws)
            _answer(ws, lambda: [pair and [pair.request, pair.response], stamp and stamp.isoformat()])
        elif op == "set_auto":
            _answer(
                ws,
                lambda: ctx.set_web_socket_auto_response(WebSocketRequestResponsePair(cmd["request"], cmd["response"])),
            )
        elif op == "clear_auto":
            _answer(ws, ctx.set_web_socket_auto_response)
        elif op == "timeout":
            _answer(ws, lambda: ctx.set_hibernatable_web_socket_event_timeout(cmd["ms"]))
        elif op == "get_timeout":
            _answer(ws, ctx.get_hibernatable_web_socket_event_timeout)
        elif op == "hang":
            await asyncio.get_running_loop().create_future()
        elif op == "busy":
            # Sends, then "runs" for cmd["seconds"] without awaiting (the fake clock moves).
            if cmd.get("suspend_first"):
                await asyncio.sleep(0)
            ws.send("partial output")
            self.flags["clock"].advance(cmd["seconds"])
            _answer(ws, lambda: "done")
        elif op == "loaded":
            _answer(ws, lambda: self.loaded)
        elif op == "block":
            result = await ctx.block_concurrency_while(self._double)
            _answer(ws, lambda: result)
        elif op == "wait_until":
            ctx.wait_until(self.flags["gate"])
            _answer(ws, lambda: None)
        elif op == "abort":
            ctx.abort("asked to")
        elif op == "close":
            _answer(ws, lambda: ws.close(cmd.get("code"), cmd.get("reason", "")))
        elif op == "send":
            _answer(ws, lambda: ws.send(cmd["value"]))
        elif op == "self_call":
            try:
                await self.env.LAB.get_by_name(ctx.id.name).add(1, 2)
            except Exception as exc:
                ws.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        elif op == "ready_state":
            _answer(ws, lambda: int(ws.ready_state))
        elif op == "count":
            _answer(ws, lambda: len(ctx.get_web_sockets()))

    async def _double(self):
        await asyncio.sleep(0)
        return 42

    def web_socket_close(self, ws, code, reason, was_clean):
        self.rec.record("close", code, reason, was_clean, ws.deserialize_attachment())

    def web_socket_error(self, ws, error):
        self.rec.record("error", error.code)

    # RPC methods
    async def add(self, a, b):
        self.rec.record("rpc", "add", a, b)
        return a + b

    def describe(self, *, who="nobody"):
        return f"{self.ctx.id.name} says hi to {who}"

    async def fail(self):
        raise KeyError("nope")


async def lab_worker(request, env):
    url = urlsplit(request.url)
    parts = url.path.split("/")
    if parts[1:2] == ["worker-accept"]:
        client, server = WebSocketPair()
        server.accept()
        return Response(status=101, web_socket=client)
    name = parts[2] if len(parts) > 2 and parts[1] == "lab" else "default"
    return await env.LAB.get_by_name(name).fetch(request)


def lab_app(recorder, flags):
    """``flags`` is shared: a test may change it while the server runs."""
    return App(fetch=lab_worker, bindings={"LAB": Lab}, vars={"REC": recorder, "FLAGS": flags})
