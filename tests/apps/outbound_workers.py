"""Outbound WebSockets under ``--workers N`` (real processes): ``/room/NAME`` joins object NAME
as a client. A client's ``connect URL`` makes the object open an upstream WebSocket to URL
(answered ``connected PID``); any other text from a client goes to the upstream. What the
upstream sends reaches every client of the object as ``TEXT pid=PID built=N``: the process
that handled it and how many instances of it that process has built so far. The class
hibernates the moment it is idle, so each upstream message wakes it again.
"""

import collections
import os

from tests.apps import room_fetch
from wsecho import App, DurableObject, Response, WebSocketPair

#: Instances built in this process, by object name.
BUILT: collections.Counter[str] = collections.Counter()


class Feed(DurableObject):
    hibernate_after = 0

    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        BUILT[ctx.id.name] += 1

    async def fetch(self, request):
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server, ["client"])
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        if "client" not in self.ctx.get_tags(ws):
            text = f"{message} pid={os.getpid()} built={BUILT[self.ctx.id.name]}"
            for client in self.ctx.get_web_sockets("client"):
                client.send(text)
        elif message.startswith("connect "):
            await self.ctx.connect_web_socket(message.removeprefix("connect "), tags=["upstream"])
            ws.send(f"connected {os.getpid()}")
        else:
            for upstream in self.ctx.get_web_sockets("upstream"):
                upstream.send(message)


app = App(fetch=room_fetch, bindings={"ROOM": Feed})
