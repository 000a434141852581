"""Rooms that broadcast: the test application of ``ctx.broadcast``.

``/<binding>/<room>/ws?tags=a,b`` joins a room (ROOMS: the default policy; DROPPING and
CLOSING: a 64 KiB per-socket queue limit that drops or closes). A member's text message is a
command:

- ``all TEXT``: broadcast TEXT to the room, then answer ``reached N`` to the sender;
- ``tag TAG TEXT``: broadcast TEXT to the sockets tagged TAG;
- ``others TEXT``: broadcast TEXT to everyone but the sender;
- ``stored TEXT``: write TEXT to storage, then broadcast it (held by the output gate);
- ``mix N``: N rounds of a broadcast ``bI`` and a ``sI`` to the sender alone;
- ``bin TEXT``: broadcast TEXT as binary;
- ``burst N SIZE``: N broadcasts of SIZE characters in one turn, then ``closing``, then close
  the sender with 4000 (its Close must come after them all).

RPC: ``shout(text)`` broadcasts from outside a socket event and returns the count.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from wsecho import App, DurableObject, Response, WebSocketPair


class Room(DurableObject):
    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        self.rec = env.REC
        self.rec.record("constructor", ctx.id.name)

    async def fetch(self, request):
        query = parse_qs(urlsplit(request.url).query)
        tags = [t for t in query.get("tags", [""])[0].split(",") if t]
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server, tags)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        command, _, arg = message.partition(" ")
        ctx = self.ctx
        if command == "all":
            ws.send(f"reached {ctx.broadcast(arg)}")
        elif command == "tag":
            tag, _, text = arg.partition(" ")
            ctx.broadcast(text, tag=tag)
        elif command == "others":
            ctx.broadcast(arg, exclude=[ws])
        elif command == "stored":
            await ctx.storage.put("last", arg)
            ctx.broadcast(arg)
        elif command == "mix":
            for i in range(int(arg)):
                ctx.broadcast(f"b{i}")
                ws.send(f"s{i}")
        elif command == "bin":
            ctx.broadcast(arg.encode())
        elif command == "burst":
            count, size = map(int, arg.split())
            for i in range(count):
                ctx.broadcast(f"{i:06d}".ljust(size, "."))
            ctx.broadcast("closing")
            ws.close(4000, "after the burst")

    def shout(self, text):
        return self.ctx.broadcast(text)

    def web_socket_close(self, ws, code, reason, was_clean):
        self.rec.record("close", code)

    def web_socket_error(self, ws, error):
        self.rec.record("error", error.code, error.reason)


class DroppingRoom(Room):
    fanout_overflow = "drop"
    fanout_queue_bytes = 64 * 1024


class ClosingRoom(Room):
    fanout_overflow = "close"
    fanout_queue_bytes = 64 * 1024


async def worker(request, env):
    _, binding, name, *_ = urlsplit(request.url).path.split("/")
    return await getattr(env, binding).get_by_name(name).fetch(request)


def fanout_app(recorder) -> App:
    return App(
        fetch=worker,
        bindings={"ROOMS": Room, "DROPPING": DroppingRoom, "CLOSING": ClosingRoom},
        vars={"REC": recorder},
    )
