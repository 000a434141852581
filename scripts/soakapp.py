"""The application scripts/soak serves: rooms that echo each message to its sender.

/room/<name> upgrades into the object <name>, so many sockets share each object and
the whole room hibernates and wakes together. ``heavy_app`` (scripts/soak-memory) serves rooms
that hold memory while awake.
"""

import os

from wsecho import App, DurableObject, DurableObjectState, Env, Request, Response, WebSocket, WebSocketPair


class Room(DurableObject):
    async def fetch(self, request: Request) -> Response:
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(message)


async def fetch(request: Request, env: object) -> Response:
    name = request.url.rsplit("/", 1)[-1]
    return await env.ROOMS.get_by_name(name).fetch(request)  # type: ignore[attr-defined, no-any-return]


app = App(fetch=fetch, bindings={"ROOMS": Room})


class HeavyRoom(Room):
    """A room whose instance holds many small Python objects (``WSECHO_SOAK_ITEMS`` of them,
    about 100 bytes each): what scripts/soak-memory bounds with --max-active-objects."""

    def __init__(self, ctx: DurableObjectState, env: Env) -> None:
        super().__init__(ctx, env)
        self.state = {i: f"entry {i} of {ctx.id.name}" for i in range(ITEMS)}


ITEMS = int(os.environ.get("WSECHO_SOAK_ITEMS", "2000"))
heavy_app = App(fetch=fetch, bindings={"ROOMS": HeavyRoom})
