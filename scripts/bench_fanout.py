#!/usr/bin/env python3
"""The fan-out baselines of ``scripts/bench``: one room, every message to every member.

Each connection on any path joins the one room; each message a member sends goes to every
member (the sender included), as it came, text as text:

- ``--kind tornado``: a bare Tornado 6 ``WebSocketHandler`` on uvloop, looping over the members
  with ``write_message`` (what an application on Tornado writes);
- ``--kind websockets``: the ``websockets`` library's asyncio server on uvloop, with its
  ``broadcast()`` (which encodes the frame once, like ``ctx.broadcast``).

No pings, no compression, no size limit below 1 MiB: the same wire as wsecho's
``benchapps:fanout_app``.

    python scripts/bench_fanout.py --kind tornado --port 0

It prints ``KIND serving on http://127.0.0.1:PORT`` on stderr once it listens, and stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import tornado.web
import tornado.websocket
import uvloop

from bench_baseline import MAX_MESSAGE_SIZE, raise_nofile_limit, serve_until_signal  # beside this script


class Member(tornado.websocket.WebSocketHandler):
    def initialize(self, room: set[Member]) -> None:
        self.room = room

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.room.add(self)

    def on_message(self, message: str | bytes) -> None:
        binary = isinstance(message, bytes)
        for member in self.room:
            member.write_message(message, binary=binary)

    def on_close(self) -> None:
        self.room.discard(self)


async def serve_tornado(host: str, port: int) -> None:
    room: set[Member] = set()
    app = tornado.web.Application([(r"/.*", Member, {"room": room})], websocket_max_message_size=MAX_MESSAGE_SIZE)
    await serve_until_signal("tornado", app, host, port)
    # Writes still queued for members that stopped reading end with the stream closed here, not
    # cancelled when the loop stops, and what Tornado's write tasks then raise is expected: the
    # benchmark fails a server that logs an error.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    for member in list(room):
        if member.ws_connection is not None and member.ws_connection.stream is not None:
            member.ws_connection.stream.close()
    await asyncio.sleep(0.1)


async def serve_websockets(host: str, port: int) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    room: set[ServerConnection] = set()

    async def member(ws: ServerConnection) -> None:
        room.add(ws)
        try:
            async for message in ws:
                broadcast(room, message)
        finally:
            room.discard(ws)

    async with serve(
        member, host, port, max_size=MAX_MESSAGE_SIZE, ping_interval=None, compression=None, backlog=4096
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"websockets serving on http://{host}:{bound}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("tornado", "websockets"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_nofile_limit()
    serve = serve_tornado if args.kind == "tornado" else serve_websockets
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
