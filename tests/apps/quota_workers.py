"""``--max-storage`` under ``--workers N`` (real processes): ``/room/NAME`` joins object NAME;
a client's ``put KEY`` stores 500 bytes under KEY and answers ``ok``, or ``refused MESSAGE``
when a quota refuses it."""

from urllib.parse import urlsplit

from wsecho import App, DurableObject, QuotaExceededError, Response, WebSocketPair

VALUE = "x" * 500


class Store(DurableObject):
    async def fetch(self, request):
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        key = message.removeprefix("put ")
        try:
            await self.ctx.storage.put(key, VALUE)
        except QuotaExceededError as exc:
            ws.send(f"refused {exc}")
        else:
            ws.send("ok")


async def fetch(request, env):
    parts = urlsplit(request.url).path.strip("/").split("/")
    if parts[0] == "room" and len(parts) == 2:
        return await env.ROOM.get_by_name(parts[1]).fetch(request)
    return Response("not found", status=404)


app = App(fetch=fetch, bindings={"ROOM": Store})
