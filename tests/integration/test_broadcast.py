"""``ctx.broadcast`` with real clients: every socket of the room (or of a tag) gets each message
exactly once and in order, hibernated sockets included; a stalled reader is dropped or closed by
its class's policy while the others keep receiving."""

import asyncio
import contextlib

import pytest
from websockets.asyncio.client import connect

from tests.apps.fanout import fanout_app
from tests.helpers import RawClient, until
from wsecho.core.lifecycle import ObjectState, SocketState

#: Served by the standalone gateway, by objects mounted in a Tornado application, and over TLS.
SERVINGS = ("standalone", "tornado", "tls")

#: Big enough that a stalled reader's queue passes the rooms' 64 KiB limit within a few hundred.
PAD = "x" * 16_000


@pytest.fixture
def wsecho_app(recorder):
    return fanout_app(recorder)


async def receive(ws, n):
    async with asyncio.timeout(5):
        return [await ws.recv() for _ in range(n)]


@contextlib.asynccontextmanager
async def members(url, count, path="/ROOMS/r/ws"):
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(url(path, "ws"))) for _ in range(count)]


@pytest.mark.gen_test
async def test_every_member_gets_each_broadcast_once_and_in_order(url):
    async with members(url, 5) as room:
        sender = room[0]
        for i in range(20):
            await sender.send(f"all m{i}")
        sent = [f"m{i}" for i in range(20)]
        # the sender gets each broadcast, then its own "reached" answer
        assert await receive(sender, 40) == [x for m in sent for x in (m, "reached 5")]
        for ws in room[1:]:
            assert await receive(ws, 20) == sent
        # exactly once: the next thing each one gets is the next broadcast
        await sender.send("all end")
        for ws in room:
            assert await receive(ws, 1) == ["end"]


@pytest.mark.gen_test
async def test_broadcasts_and_sends_of_one_turn_keep_their_order(url):
    async with members(url, 2) as (sender, other):
        await sender.send("mix 50")
        assert await receive(sender, 100) == [x for i in range(50) for x in (f"b{i}", f"s{i}")]
        assert await receive(other, 50) == [f"b{i}" for i in range(50)]


@pytest.mark.gen_test
async def test_a_burst_of_one_turn_arrives_whole_in_order_before_the_close(url):
    # 200 x 1,000 bytes: more than the server holds back for a peer before writing (64 KiB)
    async with members(url, 2) as (sender, other):
        await sender.send("burst 200 1000")
        expected = [f"{i:06d}".ljust(1000, ".") for i in range(200)] + ["closing"]
        assert await receive(other, 201) == expected
        assert await receive(sender, 201) == expected
        async with asyncio.timeout(5):
            await sender.wait_closed()
        assert sender.close_code == 4000


@pytest.mark.gen_test
async def test_binary_stays_binary(url):
    async with members(url, 2) as (sender, other):
        await sender.send("bin hello")
        assert await receive(other, 1) == [b"hello"]
        assert await receive(sender, 1) == [b"hello"]


@pytest.mark.gen_test
async def test_a_tag_or_an_exclusion_selects_the_sockets(url):
    async with (
        connect(url("/ROOMS/t/ws?tags=red", "ws")) as red,
        connect(url("/ROOMS/t/ws?tags=red,blue", "ws")) as both,
        connect(url("/ROOMS/t/ws?tags=blue", "ws")) as blue,
    ):
        await blue.send("tag red to-red")
        assert await receive(red, 1) == ["to-red"]
        assert await receive(both, 1) == ["to-red"]
        await red.send("others not-red")
        assert await receive(both, 1) == ["not-red"]
        assert await receive(blue, 1) == ["not-red"]
        await red.send("tag nobody lost")  # no socket has it: nothing goes out
        await red.send("all end")
        # blue never got "to-red", red never got its own "not-red"
        assert await receive(blue, 1) == ["end"]
        assert await receive(red, 2) == ["end", "reached 3"]
        assert await receive(both, 1) == ["end"]


@pytest.mark.gen_test
async def test_sockets_of_a_hibernated_object_get_the_broadcast_that_wakes_it(url, runtime, clock, recorder):
    async with members(url, 3, "/ROOMS/h/ws") as room:
        host = runtime.find("ROOMS", "h")
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        assert host.lifecycle.state is ObjectState.HIBERNATING
        await room[2].send("all awake")
        for ws in room:
            assert await receive(ws, 1) == ["awake"]
        assert await receive(room[2], 1) == ["reached 3"]
        assert len(recorder.of("constructor")) == 2
        # and from outside any socket event (an RPC call), to the same sockets
        assert await runtime.env.ROOMS.get_by_name("h").shout("rpc") == 3
        for ws in room:
            assert await receive(ws, 1) == ["rpc"]


@pytest.mark.gen_test
async def test_a_stored_broadcast_waits_for_its_write_and_arrives_once(url, runtime):
    async with members(url, 3, "/ROOMS/s/ws") as room:
        await room[0].send("stored durable")
        for ws in room:
            assert await receive(ws, 1) == ["durable"]
        assert runtime.stats.broadcasts == 1
        assert runtime.stats.messages_out == 3


class Reader:
    """A raw client that reads every frame as it comes (or not at all, once stalled)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.got: list[str] = []
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None

    @classmethod
    async def join(cls, port, path, *, reading=True):
        reader = cls(await RawClient.connect(port, path))
        if reading:
            reader.start()
        else:
            reader.client.writer.transport.pause_reading()
        return reader

    def start(self):
        self.client.writer.transport.resume_reading()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            opcode, payload = await self.client.read_frame(timeout=30)
            if opcode == -1:
                return
            self.got.append(payload[:8].decode())
            self.arrived.set()

    async def wait_for(self, label):
        async with asyncio.timeout(10):
            while label not in self.got:
                self.arrived.clear()
                await self.arrived.wait()

    async def close(self):
        self.client.abort()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self.task


async def stall_one(port, runtime, binding, counter):
    """Two readers and one stalled member; broadcast until the stalled one overflows."""
    readers = [await Reader.join(port, f"/{binding}/slow/ws") for _ in range(2)]
    stalled = await Reader.join(port, f"/{binding}/slow/ws", reading=False)
    stub = getattr(runtime.env, binding).get_by_name("slow")
    sent = []
    for i in range(3000):  # 48 MB at most: the kernel's buffers fill first, then the queue
        label = f"m{i:07d}"
        await stub.shout(label + PAD)
        sent.append(label)
        if getattr(runtime.stats, counter):
            break
        await asyncio.sleep(0)  # the readers read
    else:
        pytest.fail("the stalled member's queue never passed the fan-out limit")
    for i in range(len(sent), len(sent) + 20):  # the room goes on
        label = f"m{i:07d}"
        await stub.shout(label + PAD)
        sent.append(label)
    for reader in readers:
        await reader.wait_for(sent[-1])
        assert reader.got == sent  # every message, once, in order
    return readers, stalled, stub, sent


@pytest.mark.gen_test(timeout=60)
async def test_a_stalled_reader_misses_messages_while_the_others_keep_receiving(port, runtime, recorder):
    readers, stalled, stub, sent = await stall_one(port, runtime, "DROPPING", "fanout_dropped")
    try:
        assert runtime.stats.fanout_closed == 0
        link = list(runtime.find("DROPPING", "slow").sockets)[2]  # the stalled one joined last
        assert link.state is SocketState.OPEN  # dropped messages, kept the socket
        stalled.start()
        # once it reads again, its queue drains and broadcasts reach it again
        for k in range(500):
            label = f"after{k:03d}"
            await stub.shout(label)
            await readers[0].wait_for(label)
            if any(g.startswith("after") for g in stalled.got):
                break
        else:
            pytest.fail("the reader that caught up never got a broadcast again")
        got = [g for g in stalled.got if g.startswith("m")]
        assert got == sorted(set(got))  # in order, none twice
        assert set(got) < set(sent)  # some missed
        assert recorder.of("error") == []
    finally:
        for reader in [*readers, stalled]:
            await reader.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_stalled_reader_is_closed_with_1008_while_the_others_keep_receiving(port, runtime, recorder):
    readers, stalled, stub, _ = await stall_one(port, runtime, "CLOSING", "fanout_closed")
    try:
        assert runtime.stats.fanout_closed == 1
        assert runtime.stats.fanout_dropped == 0
        ((_, code, reason),) = await recorder.wait_for(lambda r: r.of("error"))
        assert code == 1008
        assert "fan-out limit of 65536 bytes" in reason
        await until(lambda: len(runtime.find("CLOSING", "slow").sockets) == 2)
        assert await stub.shout("still") == 2
    finally:
        for reader in [*readers, stalled]:
            await reader.close()


@pytest.mark.standalone_only
@pytest.mark.gen_test(timeout=60)
async def test_the_fanout_counts_are_on_metrics(recorder, tmp_path):
    from tornado.httpclient import AsyncHTTPClient

    from tests.integration.test_operations import metric
    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    server = Server(fanout_app(recorder), Settings(port=0, admin_port=0, data_dir=":memory:"))
    await server.start()
    try:
        readers, stalled, _, _ = await stall_one(server.port, server.runtime, "DROPPING", "fanout_dropped")
        for reader in [*readers, stalled]:
            await reader.close()
        response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{server.admin_port}/metrics")
        text = response.body.decode()
        stats = server.runtime.stats
        assert metric(text, "wsecho_broadcasts_total") == stats.broadcasts > 20
        assert metric(text, "wsecho_fanout_dropped_total") == stats.fanout_dropped >= 1
        assert metric(text, "wsecho_fanout_closed_total") == 0
    finally:
        await server.stop()


@pytest.mark.standalone_only
@pytest.mark.gen_test
async def test_a_broadcast_is_held_until_the_turns_write_is_durable(recorder):
    from tests.runtime.test_storage import GatedBackend
    from wsecho.api.websocket import HeldFanout
    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    backend = GatedBackend()
    server = Server(fanout_app(recorder), Settings(port=0), backend=backend)
    await server.start()
    try:
        url = f"ws://127.0.0.1:{server.port}/ROOMS/g/ws"
        async with connect(url) as a, connect(url) as b:
            await a.send("stored held")
            await until(lambda: backend.waiting == 1)
            host = server.runtime.find("ROOMS", "g")
            (held,) = host.gate
            assert isinstance(held, HeldFanout)
            assert server.runtime.stats.messages_out == 0  # nothing went out yet
            backend.gate.set()
            assert await receive(a, 1) == ["held"]
            assert await receive(b, 1) == ["held"]
            assert host.gate is None
    finally:
        await server.stop()


@pytest.mark.standalone_only
def test_bad_arguments_and_policies_are_refused_with_the_value(runtime):
    from tests.apps.fanout import Room
    from wsecho import App
    from wsecho.api.objects import DurableObjectState
    from wsecho.api.websocket import WebSocketPair
    from wsecho.core.errors import InvalidArgumentError

    ctx = DurableObjectState(runtime.host(runtime.env.ROOMS.id_from_name("bad"), Room))
    assert ctx.broadcast("nobody here") == 0
    with pytest.raises(InvalidArgumentError, match="broadcast\\(\\) takes str or bytes, not int"):
        ctx.broadcast(5)
    with pytest.raises(InvalidArgumentError, match="tag must be a str or None, got 7"):
        ctx.broadcast("x", tag=7)
    _, server = WebSocketPair()
    with pytest.raises(InvalidArgumentError, match=r"not one WebSocket \(write exclude=\[ws\]\)"):
        ctx.broadcast("x", exclude=server)
    with pytest.raises(InvalidArgumentError, match="exclude takes WebSockets, got 'ws'"):
        ctx.broadcast("x", exclude=["ws"])
    with pytest.raises(
        InvalidArgumentError, match=r"broadcast\(\): the message contains a lone surrogate \(\\ud800 at index 0\)"
    ):
        ctx.broadcast("\ud800")

    class Loud(Room):
        fanout_overflow = "shout"

    with pytest.raises(
        InvalidArgumentError, match=r"Loud\.fanout_overflow must be one of 'drop', 'close', got 'shout'"
    ):
        App(fetch=lambda r, e: None, bindings={"LOUD": Loud})

    class Tiny(Room):
        fanout_queue_bytes = 1000

    with pytest.raises(
        InvalidArgumentError,
        match=r"Tiny\.fanout_queue_bytes must be an integer of at least 65536 \(or None\), got 1000",
    ):
        App(fetch=lambda r, e: None, bindings={"TINY": Tiny})
