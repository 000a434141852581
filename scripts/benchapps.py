"""Applications that ``scripts/bench`` serves with ``python -m wsecho benchapps:NAME`` (cwd: scripts/).

``wake_app`` is wsecho's default echo application with one change: its object class sets
``hibernate_after = 0``, so wsecho hibernates the object the moment it is idle and every
message wakes it (the constructor runs again before each ``web_socket_message``).
"""

from __future__ import annotations

from wsecho import App, Request, Response, WebSocket
from wsecho.examples import echo


class WakePerMessage(echo.WebSocketHibernationServer):
    """The echo object, hibernated as soon as it has nothing to do."""

    hibernate_after = 0


wake_app = App(fetch=echo.fetch, bindings={"WEBSOCKET_HIBERNATION_SERVER": WakePerMessage})


class StoreThenEcho(echo.WebSocketHibernationServer):
    """The echo object, storing each message first: the reply waits for the commit."""

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        await self.ctx.storage.put("last", message)
        await super().web_socket_message(ws, message)


async def _fetch_own_object(request: Request, env: object) -> Response:
    namespace = env.WEBSOCKET_HIBERNATION_SERVER  # type: ignore[attr-defined]
    return await namespace.get(namespace.new_unique_id()).fetch(request)  # type: ignore[no-any-return]


storage_app = App(fetch=_fetch_own_object, bindings={"WEBSOCKET_HIBERNATION_SERVER": StoreThenEcho})
