"""A test application that tells a client who the server thinks it is, through any proxy.

Every request goes to the object named "who". ``GET /whoami`` answers the request's
``CF-Connecting-IP`` and ``request.url`` as JSON. ``/websocket`` upgrades and keeps the same
two in the socket's attachment, so that they survive hibernation; on the socket, ``whoami``
answers them, ``close CODE`` closes with that code and the reason ``bye``, and anything else
is echoed back.
"""

from __future__ import annotations

import json

from wsecho import App, DurableObject, Response, WebSocketPair

ADDRESS_HEADER = "CF-Connecting-IP"


async def fetch(request, env):
    return await env.WHO.get(env.WHO.id_from_name("who")).fetch(request)


class Who(DurableObject):
    async def fetch(self, request):
        seen = {"address": request.headers.get(ADDRESS_HEADER), "url": request.url}
        if not request.url.endswith("/websocket"):
            return Response(json.dumps(seen), headers={"Content-Type": "application/json"})
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        server.serialize_attachment(seen)
        return Response(None, status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        if message == "whoami":
            ws.send(json.dumps(ws.deserialize_attachment()))
        elif isinstance(message, str) and message.startswith("close "):
            ws.close(int(message.split()[1]), "bye")
        else:
            ws.send(message)


app = App(fetch=fetch, bindings={"WHO": Who})
