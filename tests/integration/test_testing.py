"""wsecho.testing is the real Server with a fake clock: its start-up, its shutdown, its stats."""

import asyncio

import pytest
from websockets.asyncio.client import connect

from tests.helpers import RawClient
from wsecho.examples import echo
from wsecho.serve.config import Settings
from wsecho.serve.metrics import render
from wsecho.serve.server import Server
from wsecho.testing import FakeClock, receive, serve_app

UNREAD = 20  # more than the 16 messages a websockets client queues before it stops reading


@pytest.mark.gen_test
async def test_the_harness_is_a_server_on_the_fake_clock():
    clock = FakeClock()
    async with serve_app(echo.app, clock=clock, hibernate_after=30) as t:
        assert isinstance(t.server, Server)
        assert t.runtime is t.server.runtime
        assert t.port == t.server.port
        assert t.server.settings.hibernate_after == 30
        assert t.runtime.clock() == clock.monotonic()
        ws = await t.connect("/websocket")
        await ws.send("hi")
        assert await receive(ws) == "[Durable Object]: hi"
        metrics = render(t.server.registry).decode()
        assert "wsecho_sockets_open 1.0" in metrics
        assert "wsecho_messages_received_total 1.0" in metrics
        assert t.server.status_line() == "ready: 1 WebSocket; objects: 1 active, 0 hibernating"
        await t.advance(30)
        assert t.state("WEBSOCKET_HIBERNATION_SERVER", "foo") == "hibernating"


@pytest.mark.gen_test
async def test_leaving_the_harness_runs_the_servers_drain():
    async with serve_app(echo.app) as t:
        # A client the harness did not make: only the server's shutdown closes it.
        async with connect(t.url("/websocket", "ws")) as ws:
            await ws.send("hi")
            assert await receive(ws) == "[Durable Object]: hi"
            server = t.server
            assert server.phase == "ready"
        other = await connect(t.url("/websocket", "ws"))  # left open when the block ends
    assert server.phase == "stopped"
    async with asyncio.timeout(5):
        await other.wait_closed()
    assert (other.close_code, other.close_reason) == (1001, "Going Away")


@pytest.mark.gen_test
async def test_a_client_with_unread_messages_still_closes_cleanly_at_the_end():
    # websockets stops reading once 16 messages wait unread, and so never saw the answer to
    # its Close: the harness gave up after 2 s and left the socket open (a ResourceWarning).
    async with serve_app(echo.app) as t:
        ws = await t.connect("/websocket")
        for i in range(UNREAD):
            await ws.send(str(i))
        await t.settle()  # every echo is sent; the client reads none of them
    assert ws.close_code == 1000
    assert ws.transport.is_closing()


@pytest.mark.gen_test
async def test_stop_cuts_a_peer_that_does_not_answer_the_close():
    server = Server(echo.app, Settings(port=0, data_dir=":memory:", drain_timeout=0.1))
    await server.start()
    client = await RawClient.connect(server.port)
    try:
        assert client.status == 101
        await server.stop()
        assert await client.read_close() == (1001, "Going Away")
        # The peer never answers; stop() returned, so the server holds nothing of it.
        assert not server.connections
        assert await client.read_frame(timeout=1) == (-1, b"")
    finally:
        client.abort()
