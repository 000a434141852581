"""Restart safety with a real server process: SIGKILL loses no acknowledged write, SIGTERM flushes."""

import asyncio
import random
import signal
import sqlite3

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import ServerProcess
from wsecho.backends.base import DB_FILE

SHARDS = 4


async def write_until_cut(port: int, first: int, acked: set[int], connected, window: int = 32) -> int:
    """Pipeline ``put N`` on SHARDS sockets until the server goes away; return the next N.

    ``connected()`` runs once every socket is open (the test's signal is timed from there,
    so that a slow machine cannot kill the server before the handshakes)."""
    n = first
    sockets = [await connect(f"ws://127.0.0.1:{port}/ledger/{i}") for i in range(SHARDS)]
    connected()

    async def reader(ws):
        try:
            async for message in ws:
                acked.add(int(message.split()[1]))
        except ConnectionClosed:
            pass

    readers = [asyncio.ensure_future(reader(ws)) for ws in sockets]
    try:
        while not all(r.done() for r in readers):
            for ws in sockets:
                for _ in range(window // SHARDS):
                    await ws.send(f"put {n}")
                    n += 1
            await asyncio.sleep(0.002)
    except ConnectionClosed:
        pass
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    return n


def run_in_new_loop(coro_fn):
    """Run ``coro_fn()`` on a loop of its own, leaving the test session's current loop alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


def stored(data_dir) -> tuple[set[int], str]:
    db = sqlite3.connect(data_dir / DB_FILE)
    try:
        keys = {int(k[1:]) for (k,) in db.execute("SELECT key FROM kv")}
        (check,) = db.execute("PRAGMA integrity_check").fetchone()
        return keys, check
    finally:
        db.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_loses_no_acknowledged_write(tmp_path, seed):
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    acked: set[int] = set()
    n = 0
    for _ in range(3):
        server = ServerProcess(["tests.apps.crash_app", "--port", "0", "--data-dir", str(data_dir)]).ready()
        try:

            async def run(port=server.port, proc=server.proc, first=n):
                loop = asyncio.get_running_loop()
                delay = rng.uniform(0.05, 0.4)

                def kill_soon():  # SIGKILL at a random moment while the writes stream in
                    loop.call_later(delay, proc.send_signal, signal.SIGKILL)

                return await write_until_cut(port, first, acked, kill_soon)

            n = run_in_new_loop(run)
            assert server.proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            server.stop()
        keys, check = stored(data_dir)
        assert check == "ok"
        assert acked, "the client got no acknowledgement before the kill"
        missing = acked - keys
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {sorted(missing)[:5]}"


def test_sigterm_flushes_everything_and_exits_0(tmp_path):
    data_dir = tmp_path / "data"
    acked: set[int] = set()
    server = ServerProcess(["tests.apps.crash_app", "--port", "0", "--data-dir", str(data_dir)]).ready()
    try:

        async def run():
            loop = asyncio.get_running_loop()
            return await write_until_cut(
                server.port, 0, acked, lambda: loop.call_later(0.2, server.proc.send_signal, signal.SIGTERM)
            )

        sent = run_in_new_loop(run)
        assert server.proc.wait(timeout=15) == 0
    finally:
        server.stop()
    keys, check = stored(data_dir)
    assert check == "ok"
    assert acked <= keys
    # a graceful stop commits what was handled, acknowledged or not, and nothing invented
    assert keys <= set(range(sent))
    server.wait_for(r"stopped")
