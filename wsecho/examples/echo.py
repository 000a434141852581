"""The classic WebSocket Hibernation example, ported line by line from Cloudflare's JavaScript.

``python -m wsecho`` serves this application when no other is named. Every
request goes to the object named "foo"; ``/websocket`` upgrades, and every
message is echoed back with a prefix. The only deliberate difference: a binary
message is echoed as binary (JavaScript would send the text "[object ArrayBuffer]").
"""

from __future__ import annotations

from wsecho import App, DurableObject, Request, Response, WebSocket, WebSocketPair


# Worker
async def fetch(request: Request, env: object) -> Response:
    id = env.WEBSOCKET_HIBERNATION_SERVER.id_from_name("foo")  # type: ignore[attr-defined]  # noqa: A001
    stub = env.WEBSOCKET_HIBERNATION_SERVER.get(id)  # type: ignore[attr-defined]
    return await stub.fetch(request)  # type: ignore[no-any-return]


# Durable Object
class WebSocketHibernationServer(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if request.url.endswith("/websocket"):
            upgrade_header = request.headers.get("Upgrade")
            # workerd hands the object this header's value in lower case, so the
            # original's `!== 'websocket'` accepts "WebSocket" and "WEBSOCKET" too.
            if not upgrade_header or upgrade_header.lower() != "websocket":
                return Response("Durable Object expected Upgrade: websocket", status=426)
            client, server = WebSocketPair()
            self.ctx.accept_web_socket(server)
            return Response(None, status=101, web_socket=client)
        elif request.url.endswith("/getCurrentConnections"):
            num_connections = len(self.ctx.get_web_sockets())
            if num_connections == 1:
                return Response(
                    f"There is {num_connections} WebSocket client connected to this Durable Object instance."
                )
            return Response(f"There are {num_connections} WebSocket clients connected to this Durable Object instance.")
        return Response("""
This Durable Object supports the following endpoints:
  /websocket
    - Creates a WebSocket connection, any messages sent to it are echoed with a prefix.
  /getCurrentConnections
    - A regular HTTP GET endpoint that returns the number of currently connected WebSocket clients.
""")

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if isinstance(message, bytes):  # wsecho differs: echo binary as binary
            ws.send(b"[Durable Object]: " + message)
        else:
            ws.send(f"[Durable Object]: {message}")

    async def web_socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        ws.close(code, "Durable Object is closing WebSocket")


app = App(fetch=fetch, bindings={"WEBSOCKET_HIBERNATION_SERVER": WebSocketHibernationServer})
