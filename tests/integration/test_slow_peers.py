"""Slow readers and dead peers: the server-wide budget of queued bytes, and the ping pass.

A peer that never reads must not keep its connection by sending (unsolicited Pongs, or
messages), and many of them together must not grow the server's memory past
``--max-outgoing-total``: the ones with the most queued are cut, the readers keep working.
"""

import asyncio
import contextlib

import pytest

from tests.helpers import RawClient, probe_app
from wsecho.api.websocket import WebSocketPair
from wsecho.serve.config import Settings
from wsecho.serve.connection import Connection, ConnectionSettings
from wsecho.serve.gateway import make_application
from wsecho.serve.server import Server

MiB = 1024 * 1024


@pytest.fixture
def wsecho_app(recorder):
    return probe_app(recorder)


@pytest.fixture
def registry():
    return set()


@pytest.fixture
def app(runtime, registry):
    # Each peer may have 64 MiB queued, all of them together 2 MiB: the total is what bites.
    return make_application(
        runtime, max_message_size=1000, registry=registry, max_outgoing=64 * MiB, max_outgoing_total=2 * MiB
    )


async def errors(recorder, count):
    return await recorder.wait_for(lambda r: len(r.of("error")) >= count and r.of("error"))


def connection_of(registry, ws):
    (conn,) = [c for c in registry if c.link.ws is ws]
    return conn


async def fill(ws, conn, queued):
    """Send to a peer that does not read until ``queued`` bytes wait for it in our transport."""
    chunk = "y" * 60_000
    for _ in range(2000):  # 120 MB at most: the kernel's buffers fill first, then ours
        if conn.transport is None or conn.transport.get_write_buffer_size() >= queued:
            return
        ws.send(chunk)
        await asyncio.sleep(0)
    pytest.fail(f"the peer's queue did not reach {queued} bytes")


@pytest.mark.gen_test(timeout=30)
async def test_past_the_total_budget_the_biggest_queue_is_cut_and_readers_keep_their_echoes(
    port, recorder, runtime, registry
):
    reader = await RawClient.connect(port, "/obj/reader/ws")
    slow = [await RawClient.connect(port, "/obj/x/ws") for _ in range(3)]
    for raw in slow:
        raw.writer.transport.pause_reading()  # they read nothing
    sockets = [link.ws for link in runtime.find("PROBE", "x").sockets]
    worst, second, third = [(ws, connection_of(registry, ws)) for ws in sockets]
    await fill(*second, MiB // 2)
    await fill(*third, MiB // 4)
    assert recorder.of("error") == []  # under 1 MiB together: within the budget
    await fill(*worst, 2 * MiB)  # pushes the total past 2 MiB, at over 1 MiB: the biggest
    (error,) = await errors(recorder, 1)
    assert error[:2] == ("error", 1008)
    assert "--max-outgoing-total (2097152 bytes)" in error[2]
    assert "this peer had the most queued" in error[2]
    assert worst[1].failure is not None
    assert second[1].failure is None  # the others fit again
    assert third[1].failure is None
    reader.send_frame(0x1, b"still here")
    assert await reader.read_frame() == (0x1, b"echo:still here")
    for raw in [reader, *slow]:
        raw.abort()


@contextlib.asynccontextmanager
async def pinging_server(recorder):
    """A server that pings every 0.2 s and waits 0.2 s for the answer."""
    server = Server(probe_app(recorder), Settings(port=0, ping_interval=0.2, ping_timeout=0.2, data_dir=":memory:"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.gen_test(timeout=10)
async def test_a_peer_that_never_reads_is_cut_though_it_sends_unsolicited_pongs(recorder):
    async with pinging_server(recorder) as server:
        raw = await RawClient.connect(server.port, "/obj/x/ws")
        raw.writer.transport.pause_reading()  # it never reads our Ping

        async def pong_forever():
            # RFC 6455 §5.5.3 allows unsolicited Pongs; they must not count as an answer.
            while not raw.writer.is_closing():
                raw.send_frame(0xA, b"alive, honest")
                await asyncio.sleep(0.02)

        sender = asyncio.ensure_future(pong_forever())
        try:
            events = await recorder.wait_for(lambda r: r.of("close"))
        finally:
            sender.cancel()
        assert events == [("close", 1006, "", False, 1)]
        assert server.runtime.stats.dead_peers == 1
        raw.abort()


@pytest.mark.gen_test(timeout=10)
async def test_a_peer_stays_while_it_answers_each_ping_with_its_payload_and_is_cut_when_it_does_not(recorder):
    async with pinging_server(recorder) as server:
        raw = await RawClient.connect(server.port, "/obj/x/ws")
        payloads = []
        for _ in range(3):
            opcode, payload = await raw.read_frame()
            assert opcode == 0x9
            payloads.append(payload)
            raw.send_frame(0xA, payload)
        assert len(set(payloads)) == 3  # a new payload for every Ping
        assert recorder.of("close") == []
        # A Pong with another payload does not answer the Ping.
        opcode, payload = await raw.read_frame()
        raw.send_frame(0xA, payload[::-1] + b"x")
        events = await recorder.wait_for(lambda r: r.of("close"))
        assert events == [("close", 1006, "", False, 1)]
        raw.abort()


# -- the send-queue rule, with a stand-in transport and the ping pass's clock in hand -----------------


class QueueTransport:
    """A transport whose queue size the test sets; it records what the connection does."""

    def __init__(self):
        self.size = 0
        self.aborted = False
        self.written = []

    def write(self, data):
        self.written.append(data)

    def get_write_buffer_size(self):
        return self.size

    def is_closing(self):
        return self.aborted

    def abort(self):
        self.aborted = True


def stand_in_connection(server, runtime_settings):
    _client, ws = WebSocketPair()
    conn = Connection(ws, runtime_settings, b"", server.connections, url="ws://x/", protocol=None)
    conn.transport = QueueTransport()
    server.connections.add(conn)
    return conn


def test_a_peer_whose_queue_does_not_drain_for_the_ping_timeout_is_dead(recorder):
    server = Server(probe_app(recorder), Settings(ping_interval=100, ping_timeout=5, data_dir=":memory:"))
    shared = ConnectionSettings(server.runtime, max_message_size=1000)
    stuck = stand_in_connection(server, shared)
    slow = stand_in_connection(server, shared)
    for conn in (stuck, slow):
        conn.last_seen = 1000.0  # no Ping is due within the test: only the queue rule acts
        conn.transport.size = 1 * MiB
        conn.pause_writing()
    for now in (1000.0, 1003.0, 1006.0):
        slow.transport.size -= 1000  # reads slowly, but reads
        server._ping_peers(now)
    assert stuck.transport.aborted  # nothing left its queue for more than 5 s
    assert not slow.transport.aborted
    assert server.runtime.stats.dead_peers == 1
