#!/usr/bin/env python3
"""The mounted side of ``scripts/bench``'s ``echo_mounted_100x32``: wsecho inside a Tornado application.

wsecho's default application (``wsecho.examples.echo``) served by ``wsecho.tornado.Mount`` at
prefix ``/`` in a ``tornado.web.Application`` on uvloop, storage in memory. Its frames go
through Tornado's own ``WebSocketProtocol13`` over the IOStream, exactly like the baseline's
(scripts/bench_baseline.py), so the figure is the runtime's cost on that path (issue 14: at
least 1.0x bare Tornado).

    python scripts/bench_mounted.py --port 0

It prints ``mounted serving on http://127.0.0.1:PORT`` on stderr once it listens, and stops
on SIGTERM or SIGINT (closing every socket with 1001 first, as ``Mount.stop`` does).
"""

from __future__ import annotations

import argparse
import sys

import tornado.web
import uvloop

import wsecho.tornado
from bench_baseline import MAX_MESSAGE_SIZE, raise_nofile_limit, serve_until_signal  # beside this script
from wsecho.examples.echo import app as echo_app


async def serve(host: str, port: int) -> None:
    mount = wsecho.tornado.Mount(echo_app, prefix="/", data_dir=":memory:")
    await mount.start()
    app = tornado.web.Application(mount.routes(), websocket_max_message_size=MAX_MESSAGE_SIZE)
    try:
        await serve_until_signal("mounted", app, host, port)
    finally:
        await mount.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_nofile_limit()
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
