"""An existing Tornado application with hibernating rooms mounted in it.

The Tornado app has its own handlers: ``/login?name=...`` sets a (signed) login cookie,
``/`` says who you are. ``wsecho.tornado.Mount`` adds ``/rooms/<room>`` under the same
IOLoop and HTTPServer: the room object sees the cookie in the request it gets, refuses
visitors who are not logged in, and hibernates between messages while the sockets stay open.

Run it::

    .venv/bin/python -m wsecho.examples.tornado_app --port 8888

then log in at http://127.0.0.1:8888/login?name=ann and connect a WebSocket client (with
that cookie) to ws://127.0.0.1:8888/rooms/kitchen.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from http.cookies import SimpleCookie

import tornado.httpserver
import tornado.web

import wsecho.tornado
from wsecho import App, DurableObject, Request, Response, WebSocket, WebSocketPair

#: Signs the login cookie; set your own secret in production.
COOKIE_SECRET = "change me: wsecho example"


class LoginHandler(tornado.web.RequestHandler):
    """The application's own login: a signed cookie with the name."""

    def get(self) -> None:
        name = self.get_argument("name")
        self.set_signed_cookie("user", name)
        self.write(f"logged in as {name}\n")


class HomeHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        user = self.get_signed_cookie("user")
        self.write(f"hello {user.decode() if user else 'stranger'}; rooms are under /rooms/\n")


def user_of(request: Request) -> str | None:
    """The logged-in name from the signed cookie Tornado set (the object checks the signature)."""
    cookie = SimpleCookie(request.headers.get("Cookie") or "")
    if "user" not in cookie:
        return None
    value = tornado.web.decode_signed_value(COOKIE_SECRET, "user", cookie["user"].value)
    return value.decode() if value else None


class Room(DurableObject):
    """A room: everyone in it gets every message, prefixed with the sender's name."""

    def fetch(self, request: Request) -> Response:
        name = user_of(request)
        if name is None:
            return Response("log in first: /login?name=...\n", status=401)
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server, [f"user:{name}"])
        server.serialize_attachment({"name": name})
        return Response(status=101, web_socket=client)

    def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        name = ws.deserialize_attachment()["name"]
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        for other in self.ctx.get_web_sockets():
            other.send(f"{name}: {text}")

    def web_socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        ws.close(code, "bye")


async def worker(request: Request, env: object) -> Response:
    room = request.url.split("/rooms/", 1)[1].split("?", 1)[0].split("/", 1)[0] or "lobby"
    return await env.ROOMS.get_by_name(room).fetch(request)  # type: ignore[attr-defined, no-any-return]


rooms_app = App(fetch=worker, bindings={"ROOMS": Room})


def make_application(rooms: wsecho.tornado.Mount) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/login", LoginHandler), (r"/", HomeHandler), *rooms.routes()],
        cookie_secret=COOKIE_SECRET,
    )


async def main(port: int, data_dir: str) -> None:
    rooms = wsecho.tornado.Mount(rooms_app, prefix="/rooms/", data_dir=data_dir)
    await rooms.start()
    server = tornado.httpserver.HTTPServer(make_application(rooms))
    server.listen(port, "127.0.0.1")
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    await rooms.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--data-dir", default=":memory:")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.data_dir))
