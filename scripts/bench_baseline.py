#!/usr/bin/env python3
"""The bare Tornado baseline of ``scripts/bench``: a WebSocketHandler echo server on uvloop.

It answers every message like wsecho's default application does: ``[Durable Object]: ``
followed by the message, text as text and binary as binary, so one client checks both.
Any path is upgraded (wsecho's default application upgrades on ``/websocket``).

    python scripts/bench_baseline.py --port 0 [--compression]

``--compression`` turns on Tornado's permessage-deflate (``get_compression_options``
returning ``{}``: its defaults). It prints ``baseline serving on http://127.0.0.1:PORT`` on
stderr once it listens, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import ssl
import sys

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket
import uvloop

PREFIX_TEXT = "[Durable Object]: "
PREFIX_BYTES = PREFIX_TEXT.encode()
#: The same limit as wsecho's default --max-message-size.
MAX_MESSAGE_SIZE = 1024 * 1024


class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.write_message(PREFIX_BYTES + message, binary=True)
        else:
            self.write_message(PREFIX_TEXT + message)


class DeflateEcho(Echo):
    def get_compression_options(self) -> dict[str, object]:
        return {}


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve_until_signal(
    name: str, app: tornado.web.Application, host: str, port: int, tls: ssl.SSLContext | None = None
) -> None:
    """Serve ``app``, print ``NAME serving on http://HOST:PORT`` on stderr once it listens, and
    return after stopping the HTTP server on the first SIGTERM or SIGINT (scripts/bench_mounted.py
    serves the same way)."""
    sockets = tornado.netutil.bind_sockets(port, host, backlog=4096)
    server = tornado.httpserver.HTTPServer(app, ssl_options=tls)
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()[1]
    print(
        f"{name} serving on {'https' if tls else 'http'}://{host}:{bound} "
        f"({type(asyncio.get_running_loop()).__module__} loop)",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


async def serve(host: str, port: int, tls: ssl.SSLContext | None, compression: bool) -> None:
    handler = DeflateEcho if compression else Echo
    app = tornado.web.Application([(r"/.*", handler)], websocket_max_message_size=MAX_MESSAGE_SIZE)
    await serve_until_signal("baseline", app, host, port, tls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile", help="serve https:// and wss:// with this certificate (and --keyfile)")
    parser.add_argument("--keyfile")
    parser.add_argument("--compression", action="store_true", help="permessage-deflate, Tornado's defaults")
    args = parser.parse_args()
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    raise_nofile_limit()
    uvloop.run(serve(args.host, args.port, tls, args.compression))
    return 0


if __name__ == "__main__":
    sys.exit(main())
