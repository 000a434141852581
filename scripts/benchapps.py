"""Applications that ``scripts/bench`` serves with ``python -m wsecho benchapps:NAME`` (cwd: scripts/).

``wake_app`` is wsecho's default echo application with one change: its object class sets
``hibernate_after = 0``, so wsecho hibernates the object the moment it is idle and every
message wakes it (the constructor runs again before each ``web_socket_message``).

``fanout_app`` and ``fanout_loop_app`` are one room (every connection joins it) that sends each
message it receives to every member, the sender included: with ``ctx.broadcast`` and with the
application-level loop over ``ctx.get_web_sockets()`` that ``ctx.broadcast`` replaces (the
baselines on Tornado and websockets are scripts/bench_fanout.py).
"""

from __future__ import annotations

from typing import Any

from wsecho import App, DurableObject, Request, Response, WebSocket, WebSocketPair
from wsecho.examples import echo


class WakePerMessage(echo.WebSocketHibernationServer):
    """The echo object, hibernated as soon as it has nothing to do."""

    hibernate_after = 0


wake_app = App(fetch=echo.fetch, bindings={"WEBSOCKET_HIBERNATION_SERVER": WakePerMessage})


class BroadcastRoom(DurableObject):
    """Every message to every member, with ``ctx.broadcast`` (the default slow-consumer policy)."""

    async def fetch(self, request: Request) -> Response:
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(status=101, web_socket=client)

    def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        self.ctx.broadcast(message)


class LoopRoom(BroadcastRoom):
    """The same room as an application writes it without ``ctx.broadcast``."""

    def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        for member in self.ctx.get_web_sockets():
            member.send(message)


async def _room(request: Request, env: Any) -> Response:
    response: Response = await env.ROOMS.get_by_name("room").fetch(request)
    return response


fanout_app = App(fetch=_room, bindings={"ROOMS": BroadcastRoom})
fanout_loop_app = App(fetch=_room, bindings={"ROOMS": LoopRoom})


class StoreThenEcho(echo.WebSocketHibernationServer):
    """The echo object, storing each message first: the reply waits for the commit."""

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        await self.ctx.storage.put("last", message)
        await super().web_socket_message(ws, message)


async def _fetch_own_object(request: Request, env: object) -> Response:
    namespace = env.WEBSOCKET_HIBERNATION_SERVER  # type: ignore[attr-defined]
    return await namespace.get(namespace.new_unique_id()).fetch(request)  # type: ignore[no-any-return]


storage_app = App(fetch=_fetch_own_object, bindings={"WEBSOCKET_HIBERNATION_SERVER": StoreThenEcho})
