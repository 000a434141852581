"""``--max-storage`` under ``--workers N`` (real processes): ``/room/NAME`` joins object NAME;
a client's ``put KEY`` stores 500 bytes under KEY and answers ``ok``, or ``refused MESSAGE``
when a quota refuses it."""

from tests.apps import room_fetch
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


app = App(fetch=room_fetch, bindings={"ROOM": Store})
