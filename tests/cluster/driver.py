"""The clients of the fault tests (tests/cluster/test_faults.py), run inside a namespace:

    python -m tests.cluster.driver URL HISTORY ROOM [ROOM ...]

For each room, one WebSocket client sends ``inc`` and waits for ``ack N`` again and again,
through the load balancer at URL; when its connection is refused or closed, it reconnects
(after 50 ms). Every acknowledged write and every close is appended to HISTORY with the
monotonic time (``ack ROOM N T``, ``closed ROOM CODE T``); it stops when HISTORY.stop exists.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus


def log(history: Path, line: str) -> None:
    fd = os.open(history, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line} {time.monotonic()}\n".encode())
    finally:
        os.close(fd)


async def client(url: str, history: Path, room: str, stop: Path) -> None:
    while not stop.exists():
        try:
            async with asyncio.timeout(10):
                ws = await connect(f"{url}/room/{room}", open_timeout=3, close_timeout=1)
        except (OSError, InvalidHandshake, InvalidStatus, TimeoutError) as exc:
            log(history, f"refused {room} {type(exc).__name__}")
            await asyncio.sleep(0.05)
            continue
        try:
            while not stop.exists():
                await ws.send("inc")
                reply = await asyncio.wait_for(ws.recv(), 3)  # a silent peer: its host is cut off
                log(history, f"ack {room} {int(str(reply).split()[1])}")
                await asyncio.sleep(0.01)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            log(history, f"closed {room} {code}")
        except TimeoutError:
            log(history, f"closed {room} timeout")
        finally:
            await ws.close()
        await asyncio.sleep(0.05)


def dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def main(url: str, history: Path, rooms: list[str]) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump_tasks)
    stop = history.with_suffix(".stop")
    await asyncio.gather(*(client(url, history, room, stop) for room in rooms))


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it is, when a test wonders
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
