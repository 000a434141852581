"""Applications that ``scripts/bench`` serves with ``python -m wsecho benchapps:NAME`` (cwd: scripts/).

``wake_app`` is wsecho's default echo application with one change: its object class sets
``hibernate_after = 0``, so wsecho hibernates the object the moment it is idle and every
message wakes it (the constructor runs again before each ``web_socket_message``).

``fanout_app`` and ``fanout_loop_app`` are one room (every connection joins it) that sends each
message it receives to every member, the sender included: with ``ctx.broadcast`` and with the
application-level loop over ``ctx.get_web_sockets()`` that ``ctx.broadcast`` replaces (the
baselines on Tornado and websockets are scripts/bench_fanout.py).

``rooms_app`` spreads the same echo over many objects: ``/room/NAME`` upgrades into the
object named NAME (``env.ROOMS.get_by_name``), which echoes each message, with the default
application's prefix, to its sender only. With ``--workers N`` the rooms are spread over the
workers, so it is the application of the ``workers_*`` figures. ``busy_rooms_app`` is the same
with a handler that does real work first: PBKDF2-SHA256 of the message, a fixed number of
iterations (about 0.3 ms of CPU here).
"""

from __future__ import annotations

import hashlib
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


class Room(echo.WebSocketHibernationServer):
    """The echo object (its ``web_socket_message``), accepting an upgrade on any path."""

    async def fetch(self, request: Request) -> Response:
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(None, status=101, web_socket=client)


async def rooms_fetch(request: Request, env: object) -> Response:
    """``/room/NAME`` to the object NAME; the name comes from the URL alone, as ``--workers`` needs."""
    name = request.url.rsplit("/", 1)[-1]
    return await env.ROOMS.get_by_name(name).fetch(request)  # type: ignore[attr-defined, no-any-return]


rooms_app = App(fetch=rooms_fetch, bindings={"ROOMS": Room})


#: PBKDF2 iterations per message in busy_rooms_app: a fixed amount of work, not of time, so
#: that a busy machine makes it slower instead of cheaper.
WORK_ITERATIONS = 1000


class BusyRoom(Room):
    """The room, with a handler that hashes each message before echoing it."""

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        hashlib.pbkdf2_hmac("sha256", data, b"wsecho-bench", WORK_ITERATIONS)
        await super().web_socket_message(ws, message)


busy_rooms_app = App(fetch=rooms_fetch, bindings={"ROOMS": BusyRoom})
