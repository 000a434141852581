"""Restart safety with a real server process: SIGKILL loses no acknowledged write, SIGTERM flushes."""

import asyncio
import contextlib
import os
import random
import re
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


@pytest.fixture(params=["sqlite", "postgres", "postgres-2-workers"])
def storage(request, tmp_path):
    """(the server's storage flags, how many processes serve, a reader of the stored keys)."""
    if request.param == "sqlite":
        data_dir = tmp_path / "data"
        return ["--data-dir", str(data_dir)], 1, lambda: stored(data_dir)
    import psycopg

    url = request.getfixturevalue("postgres_url")

    def keys():
        with psycopg.connect(url) as conn:
            return {int(bytes(k)[1:]) for (k,) in conn.execute("SELECT key FROM kv")}, "ok"

    workers = 2 if request.param.endswith("workers") else 1
    # A cluster member restarted after SIGKILL waits for its predecessor's leases to expire
    # (it cannot know that process is gone): a short ttl keeps the test short.
    return ["--storage", url, "--workers", str(workers), "--lease-ttl", "1"], workers, keys


def every_pid(server, workers) -> list[int]:
    """The server's process and, with --workers, each worker's (from its start-up lines)."""
    found = [int(m.group(1)) for line in server.seen if (m := re.search(r"worker \d+ started \(pid (\d+)\)", line))]
    assert len(found) == (workers if workers > 1 else 0)
    return [server.proc.pid, *found]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_loses_no_acknowledged_write(storage, seed):
    flags, workers, read_stored = storage
    rng = random.Random(seed)
    acked: set[int] = set()
    n = 0
    for _ in range(3):
        server = ServerProcess(["tests.apps.crash_app", "--port", "0", *flags]).ready()
        pids = every_pid(server, workers)
        try:

            async def run(port=server.port, first=n, pids=pids):
                loop = asyncio.get_running_loop()
                delay = rng.uniform(0.05, 0.4)

                def kill_all():  # every process of the server at once: a machine that loses power
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)

                def kill_soon():  # SIGKILL at a random moment while the writes stream in
                    loop.call_later(delay, kill_all)

                return await write_until_cut(port, first, acked, kill_soon)

            n = run_in_new_loop(run)
            assert server.proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            server.stop()
            for pid in pids[1:]:  # workers that a failed test left behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        keys, check = read_stored()
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
