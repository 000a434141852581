"""Applications that ``scripts/bench`` serves with ``python -m wsecho benchapps:NAME`` (cwd: scripts/).

``wake_app`` is wsecho's default echo application with one change: its object class sets
``hibernate_after = 0``, so wsecho hibernates the object the moment it is idle and every
message wakes it (the constructor runs again before each ``web_socket_message``).

``rooms_app`` spreads the same echo over many objects: ``/room/NAME`` upgrades into the
object named NAME (``env.ROOMS.get_by_name``), which echoes each message, with the default
application's prefix, to its sender only. With ``--workers N`` the rooms are spread over the
workers, so it is the application of the ``workers_*`` figures.
"""

from __future__ import annotations

from wsecho import App, Request, Response, WebSocketPair
from wsecho.examples import echo


class WakePerMessage(echo.WebSocketHibernationServer):
    """The echo object, hibernated as soon as it has nothing to do."""

    hibernate_after = 0


wake_app = App(fetch=echo.fetch, bindings={"WEBSOCKET_HIBERNATION_SERVER": WakePerMessage})


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
