"""A test application for bounded memory: rooms that keep state in storage, attachments and
tags (so an evicted one can be seen waking intact) and can be pinned in memory on command.

``/<room>/ws?tags=a,b`` joins room ``<room>`` of ``env.ROOMS`` (``&plain=1``: a non-hibernatable
socket). A message is a command; the answer starts with the room's name:

- ``put K V`` stores ``V`` under ``K`` and answers ``stored``; ``get K`` answers the value;
- ``attach X`` sets the socket's attachment; ``whoami`` answers ``<attachment> <tags>``;
- ``hold`` keeps the turn running until ``env.GATE`` resolves (answers ``held`` after it);
- ``block`` starts ``block_concurrency_while(env.GATE)`` outside any turn;
- ``later`` hands ``env.GATE`` to ``wait_until``; ``awake`` keeps the room awake for an hour;
- anything else is echoed.
"""

from __future__ import annotations

import asyncio
import datetime
from urllib.parse import parse_qs, urlsplit

from wsecho import App, DurableObject, Response, WebSocketPair


class MemoryRoom(DurableObject):
    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        self.name = ctx.id.name
        env.REC.record("constructor", self.name)

    async def fetch(self, request):
        query = parse_qs(urlsplit(request.url).query)
        tags = [t for t in query.get("tags", [""])[0].split(",") if t]
        client, server = WebSocketPair()
        if query.get("plain"):
            server.accept()  # its messages reach web_socket_message like the others
        else:
            self.ctx.accept_web_socket(server, tags)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        verb, _, rest = message.partition(" ")
        ctx = self.ctx
        if verb == "put":
            key, _, value = rest.partition(" ")
            await ctx.storage.put(key, value)
            answer = "stored"
        elif verb == "get":
            answer = await ctx.storage.get(rest)
        elif verb == "attach":
            ws.serialize_attachment(rest)
            answer = "attached"
        elif verb == "whoami":
            answer = f"{ws.deserialize_attachment()} {','.join(ctx.get_tags(ws))}"
        elif verb == "hold":
            await self.env.GATE
            answer = "held"
        elif verb == "block":
            gate = self.env.GATE
            asyncio.get_running_loop().call_soon(ctx.block_concurrency_while, lambda: gate)
            answer = "blocking"
        elif verb == "later":
            ctx.wait_until(self.env.GATE)
            answer = "waiting"
        elif verb == "awake":
            ctx.keep_awake_until(datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
            answer = "awake"
        else:
            answer = message
        ws.send(f"{self.name} {answer}")


async def memory_worker(request, env):
    room = urlsplit(request.url).path.split("/")[1]
    return await env.ROOMS.get_by_name(room).fetch(request)


def memory_app(recorder, gate):
    """``gate``: the future ``hold``, ``block`` and ``later`` wait for."""
    return App(fetch=memory_worker, bindings={"ROOMS": MemoryRoom}, vars={"REC": recorder, "GATE": gate})
