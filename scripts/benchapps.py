"""Applications that ``scripts/bench`` serves with ``python -m wsecho benchapps:NAME`` (cwd: scripts/).

``wake_app`` is wsecho's default echo application with one change: its object class sets
``hibernate_after = 0``, so wsecho hibernates the object the moment it is idle and every
message wakes it (the constructor runs again before each ``web_socket_message``).
"""

from __future__ import annotations

from wsecho import App
from wsecho.examples import echo


class WakePerMessage(echo.WebSocketHibernationServer):
    """The echo object, hibernated as soon as it has nothing to do."""

    hibernate_after = 0


wake_app = App(fetch=echo.fetch, bindings={"WEBSOCKET_HIBERNATION_SERVER": WakePerMessage})
