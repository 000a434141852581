"""A plain mirror: every WebSocket message comes back unchanged, for conformance testing.

``python -m wsecho wsecho.examples.mirror`` serves it; ``scripts/autobahn`` runs the
Autobahn|Testsuite cases against it. Unlike ``echo`` (one object, a prefix on every
reply), this is what Autobahn's fuzzing client expects of a server under test:

- A request with ``Upgrade: websocket`` (any letter case) on **any path** is upgraded.
  Each connection gets an object of its own (``env.MIRROR.new_unique_id()``), so one
  test case's socket never shares an object, its event queue or its hibernation with
  another's.
- Every message is sent back as it came: text as text, binary as binary, the empty
  message included.
- A client's Close is answered with the same code (no code if it sent none) and no reason.
- Any other request gets 200 and a short text saying what this is.
"""

from __future__ import annotations

from wsecho import App, DurableObject, DurableObjectNamespace, Env, Request, Response, WebSocket, WebSocketPair

USAGE = """\
wsecho mirror: every WebSocket message is sent back unchanged (text as text, binary as binary).
Connect with Upgrade: websocket on any path; each connection gets an object of its own.
This is the application Autobahn|Testsuite (scripts/autobahn) runs against.
"""


def wants_upgrade(request: Request) -> bool:
    return (request.headers.get("Upgrade") or "").strip().lower() == "websocket"


# Worker: a fresh object for every upgrade; plain requests are answered here.
async def fetch(request: Request, env: Env) -> Response:
    if not wants_upgrade(request):
        return Response(USAGE)
    namespace: DurableObjectNamespace = env.MIRROR
    return await namespace.get(namespace.new_unique_id()).fetch(request)


# Durable Object: one per connection.
class Mirror(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if not wants_upgrade(request):
            return Response(USAGE)
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(None, status=101, web_socket=client)

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(message)

    async def web_socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        if not was_clean:
            return  # the connection is gone (1006) or was failed: nothing to answer
        # Answer the client's Close with its own code; 1005 means its Close had none.
        ws.close(None if code == 1005 else code)


app = App(fetch=fetch, bindings={"MIRROR": Mirror})
