"""The application of the ``--workers`` tests (real processes and the in-process mesh).

``/room/NAME`` reaches the object NAME: an upgrade is accepted; a plain request answers
``NAME PID COUNT SOCKETS``. On a socket, ``inc`` adds one to the stored count and answers
``ack N`` (after the write is durable: the output gate); ``pid`` answers the process id.
``/rpc/FROM/TO`` makes FROM call TO's methods and reports what came back.

With ``WSECHO_TEST_PROBE_LOG`` set, every constructor run (``ctor NAME PID T INSTANCE``) and
every turn (``turn NAME PID START END INSTANCE ACTED``) is appended to that file, one line
each (O_APPEND: lines of several processes do not mix). Times are monotonic seconds,
comparable across processes and network namespaces; INSTANCE is random per constructor run.
ACTED is the last time the runtime gave the turn control to go on: its start, or the return
of an await that suspended it (``Turn.wait``). A turn that the runtime unwinds
(``ObjectResetError`` at an await) acted last before that await; what runs after ACTED
without suspending is a turn's synchronous rest, which a process paused in the middle of it
runs when it resumes, whatever its runtime does.
"""

import asyncio
import json
import os
import secrets
import time
from urllib.parse import urlsplit

from tests.apps import room_fetch
from wsecho import App, DurableObject, Response, WebSocketPair
from wsecho.core.errors import InvalidArgumentError

LOG = os.environ.get("WSECHO_TEST_PROBE_LOG")


def record(*fields) -> None:
    if LOG:
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (" ".join(map(str, fields)) + "\n").encode())
        finally:
            os.close(fd)


class Turn:
    """When a turn last acted: its start, or the moment the runtime resumed it after an await
    that suspended it. An await that completes without suspending (a cached read) is the
    turn's synchronous code going on, not the runtime handing it control again."""

    def __init__(self) -> None:
        self.start = self.acted = time.monotonic()

    async def wait(self, aw):
        loop_ran = []
        handle = asyncio.get_running_loop().call_soon(loop_ran.append, True)  # runs only if it suspends
        try:
            result = await aw
        finally:
            handle.cancel()
        if loop_ran:  # resumed with what it waited for (not unwound by an exception)
            self.acted = time.monotonic()
        return result


class Room(DurableObject):
    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        self.instance = secrets.token_hex(4)
        record("ctor", ctx.id.name, os.getpid(), time.monotonic(), self.instance)

    def _turn_ended(self, turn: Turn) -> None:
        record("turn", self.ctx.id.name, os.getpid(), turn.start, time.monotonic(), self.instance, turn.acted)

    async def fetch(self, request):
        turn = Turn()
        try:
            if (request.headers.get("Upgrade") or "").lower() == "websocket":
                client, server = WebSocketPair()
                self.ctx.accept_web_socket(server)
                return Response(status=101, web_socket=client)
            count = await turn.wait(self.ctx.storage.get("count")) or 0
            name = self.ctx.id.name
            return Response(f"{name} {os.getpid()} {count} {len(self.ctx.get_web_sockets())}")
        finally:
            self._turn_ended(turn)

    async def web_socket_message(self, ws, message):
        turn = Turn()
        try:
            if message == "pid":
                ws.send(f"pid {os.getpid()}")
            elif message == "inc":
                n = (await turn.wait(self.ctx.storage.get("count")) or 0) + 1
                await turn.wait(self.ctx.storage.put("count", n))
                ws.send(f"ack {n}")
            else:
                ws.send(message)
        finally:
            self._turn_ended(turn)

    # RPC methods
    def add(self, numbers, blob=b""):
        return {"sum": sum(numbers), "pid": os.getpid(), "blob": blob, "tuple": (1, 2)}

    def fail(self):
        raise LookupError("nothing under that name")

    def echo(self, value):
        return value

    def leak(self):
        return object()

    def hit(self):
        """How many calls this instance took, and which instance (a call served twice shows)."""
        self.hits = getattr(self, "hits", 0) + 1
        return [self.hits, self.instance]


async def fetch(request, env):
    parts = urlsplit(request.url).path.strip("/").split("/")
    if parts[0] == "rpc" and len(parts) == 3:
        return await env.ROOM.get_by_name(parts[1]).fetch(f"https://rpc/{parts[2]}")
    return await room_fetch(request, env)


class Caller(Room):
    """A Room whose plain fetch to ``https://rpc/TO`` calls TO's methods."""

    async def fetch(self, request):
        url = urlsplit(request.url)
        if url.netloc != "rpc":
            return await super().fetch(request)
        stub = self.env.ROOM.get_by_name(url.path.strip("/"))
        report = {"add": await stub.add([1, 2, 3], blob=b"\x00\xff")}
        report["add"]["blob"] = report["add"]["blob"].hex()
        try:
            await stub.fail()
        except LookupError as exc:
            report["fail"] = f"LookupError: {exc}"
        try:
            await stub.echo({1, 2})
        except InvalidArgumentError as exc:
            report["echo_set"] = str(exc)
        try:
            await stub.leak()
        except InvalidArgumentError as exc:
            report["leak"] = str(exc)
        return Response(json.dumps(report), headers={"Content-Type": "application/json"})


app = App(fetch=fetch, bindings={"ROOM": Caller})
