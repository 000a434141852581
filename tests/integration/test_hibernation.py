"""Hibernation through the runtime: eviction by sweep(now=...), waking, ordering, pins."""

import asyncio

import pytest
from websockets.asyncio.client import connect

from tests.helpers import constructions, probe_app, until
from wsecho.api.websocket import link_of
from wsecho.core.lifecycle import ObjectState

#: Served by the standalone gateway, by objects mounted in a Tornado application, and over TLS.
SERVINGS = ("standalone", "tornado", "tls")


@pytest.fixture
def wsecho_app(recorder):
    return probe_app(recorder)


@pytest.mark.gen_test
async def test_idle_object_hibernates_and_a_message_wakes_it(url, runtime, clock, recorder):
    async with connect(url("/obj/room/ws", "ws")) as ws:
        await ws.send("one")
        assert await ws.recv() == "echo:one"
        host = runtime.find("PROBE", "room")
        assert host.lifecycle.state is ObjectState.ACTIVE
        # not yet idle long enough
        assert runtime.sweep(now=clock.monotonic() + 9.9) == 0
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        assert host.lifecycle.state is ObjectState.HIBERNATING
        assert host.instance is None
        assert len(constructions(recorder, "room")) == 1
        # the socket stayed open; the next message re-runs the constructor
        await ws.send("two")
        assert await ws.recv() == "echo:two"
        assert host.lifecycle.state is ObjectState.ACTIVE
        assert len(constructions(recorder, "room")) == 2
        # get_web_sockets() already works inside the constructor
        assert constructions(recorder, "room")[1] == ("constructor", "room", 1)


@pytest.mark.gen_test
async def test_in_memory_fields_are_gone_after_hibernation(url, runtime, clock):
    async with connect(url("/obj/m/ws", "ws")) as ws:
        await ws.send("remember me")
        assert await ws.recv() == "echo:remember me"
        await ws.send("memory")
        assert await ws.recv() == '["remember me"]'
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        await ws.send("memory")
        assert await ws.recv() == "[]"


@pytest.mark.gen_test
async def test_a_burst_to_a_hibernated_object_constructs_once_in_order(url, runtime, clock, recorder):
    async with connect(url("/obj/burst/ws", "ws")) as ws:
        runtime.sweep(now=clock.monotonic() + 10)
        assert runtime.find("PROBE", "burst").lifecycle.state is ObjectState.HIBERNATING
        for i in range(50):
            await ws.send(f"m{i}")
        replies = [await ws.recv() for _ in range(50)]
        assert replies == [f"echo:m{i}" for i in range(50)]
        assert len(constructions(recorder, "burst")) == 2
        assert [e[1] for e in recorder.of("message")] == [f"m{i}" for i in range(50)]


@pytest.mark.gen_test
async def test_concurrent_requests_to_a_new_object_construct_it_once(runtime, recorder):
    stub = runtime.env.PROBE.get_by_name("direct")
    results = await asyncio.gather(*(stub.fetch(f"http://x/obj/direct/count?{i}") for i in range(3)))
    assert [r.body for r in results] == [b"0", b"0", b"0"]
    assert len(constructions(recorder, "direct")) == 1
    assert runtime.find("PROBE", "direct").lifecycle.state is ObjectState.ACTIVE


@pytest.mark.gen_test
async def test_two_sockets_accepted_in_the_same_instant_still_hibernate(url, runtime, clock, recorder):
    # The fake clock does not move: both sockets are accepted at the same instant.
    async with connect(url("/obj/twins/ws", "ws")) as a, connect(url("/obj/twins/ws", "ws")) as b:
        host = runtime.find("PROBE", "twins")
        assert len(host.sockets) == 2
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        assert host.lifecycle.state is ObjectState.HIBERNATING
        await a.send("a")
        await b.send("b")
        assert await a.recv() == "echo:a"
        assert await b.recv() == "echo:b"


@pytest.mark.gen_test
async def test_activity_postpones_hibernation(url, runtime, clock):
    async with connect(url("/obj/busy/ws", "ws")) as ws:
        clock.advance(8)
        await ws.send("still here")
        assert await ws.recv() == "echo:still here"
        assert runtime.sweep(now=clock.monotonic() + 5) == 0
        assert runtime.sweep(now=clock.monotonic() + 10) == 1


@pytest.mark.gen_test
async def test_an_object_in_a_turn_does_not_hibernate(runtime, clock):
    # An async handler that is still running pins its object.
    gate = asyncio.get_running_loop().create_future()
    runtime.app.vars["FLAGS"]["gate"] = gate
    stub = runtime.env.PROBE.get_by_name("pinned")
    pending = asyncio.ensure_future(stub.fetch("http://x/obj/pinned/wait"))
    host = await _host_when_busy(runtime, "pinned")
    assert host.lifecycle.hibernation_blocker() == "an event is being handled"
    assert runtime.sweep(now=clock.monotonic() + 100) == 0
    assert host.lifecycle.state is ObjectState.ACTIVE
    gate.set_result(None)
    assert (await pending).body == b"done"
    assert runtime.sweep(now=clock.monotonic() + 10) == 1


async def _host_when_busy(runtime, name):
    # stub.fetch() submits on its first step; one loop iteration lets it run.
    await asyncio.sleep(0)
    host = runtime.find("PROBE", name)
    assert host is not None
    assert host.lifecycle.current is not None
    return host


@pytest.mark.gen_test
async def test_async_handlers_finish_in_turn(url):
    async with connect(url("/obj/async/ws", "ws")) as ws:
        await ws.send("async")
        await ws.send("after")
        assert await ws.recv() == "async:async"
        assert await ws.recv() == "echo:after"


@pytest.mark.gen_test
async def test_ping_is_answered_without_waking(url, runtime, clock, recorder):
    async with connect(url("/obj/ping/ws", "ws")) as ws:
        host = runtime.find("PROBE", "ping")
        runtime.sweep(now=clock.monotonic() + 10)
        assert host.lifecycle.state is ObjectState.HIBERNATING
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        assert host.lifecycle.state is ObjectState.HIBERNATING
        assert len(constructions(recorder, "ping")) == 1


@pytest.mark.gen_test
async def test_objects_with_nothing_left_are_forgotten(url, runtime, clock, recorder):
    async with connect(url("/obj/gone/ws", "ws")) as ws:
        await ws.send("x")
        await ws.recv()
    await recorder.wait_for(lambda r: r.of("close"))
    runtime.sweep(now=clock.monotonic() + 10)
    assert runtime.find("PROBE", "gone") is None


@pytest.mark.gen_test
async def test_sends_before_the_handshake_arrive_first(url, runtime):
    runtime.app.vars["FLAGS"]["send_early"] = True
    async with connect(url("/obj/early/ws", "ws")) as ws:
        assert await ws.recv() == "early"


@pytest.mark.gen_test
async def test_a_flooding_socket_is_paused_not_buffered(url, runtime):
    # The object is stuck in a slow turn; the client sends far more than the
    # queue allows. The server stops reading that socket at the high-water
    # mark, and once the object catches up every message is handled in order.
    from wsecho.runtime.runtime import QUEUE_HIGH_WATER

    gate = asyncio.get_running_loop().create_future()
    runtime.app.vars["FLAGS"]["gate"] = gate
    async with connect(url("/obj/flood/ws", "ws")) as ws:
        host = runtime.find("PROBE", "flood")
        stub = runtime.env.PROBE.get_by_name("flood")
        blocked = asyncio.ensure_future(stub.fetch("http://x/obj/flood/wait"))
        total = QUEUE_HIGH_WATER * 5
        try:
            for i in range(total):
                await ws.send(f"m{i}")
            await until(lambda: len(host.lifecycle.queue) >= QUEUE_HIGH_WATER)
            # The socket is paused on its pending future: no queue growth past the mark.
            assert len(host.lifecycle.queue) == QUEUE_HIGH_WATER
        finally:
            gate.set_result(None)
        await blocked
        replies = [await ws.recv() for _ in range(total)]
        assert replies == [f"echo:m{i}" for i in range(total)]


@pytest.mark.gen_test
async def test_hibernate_after_zero_hibernates_after_every_event(recorder):
    # A class that sets hibernate_after = 0 is woken by every event and hibernates
    # as soon as it is idle: no sweep is needed.
    from tests.helpers import Probe
    from wsecho import App
    from wsecho.runtime.runtime import Runtime

    class Eager(Probe):
        hibernate_after = 0

    async def fetch(request, env):
        return await env.EAGER.get_by_name("e").fetch(request)

    rt = Runtime(
        App(fetch=fetch, bindings={"EAGER": Eager}, vars={"REC": recorder, "FLAGS": {}}),
        clock=lambda: 0.0,
        wall_clock=lambda: None,
    )
    stub = rt.env.EAGER.get_by_name("e")
    for _ in range(3):
        assert (await stub.fetch("http://x/obj/e/count")).body == b"0"
    assert len(recorder.of("constructor")) == 3
    assert rt.find("EAGER", "e") is None  # hibernated, nothing left in memory


@pytest.mark.gen_test
async def test_eager_handlers_false_gives_every_handler_its_own_task():
    # A message arrives in a socket callback, where no task runs. An eager handler's first
    # step runs right there, so asyncio.timeout() at its top fails; with
    # eager_handlers = False the handler has its own task from its first line.
    from tests.helpers import FakeTransport
    from wsecho import App, DurableObject, Response
    from wsecho.api.objects import DurableObjectState
    from wsecho.api.websocket import WebSocketPair
    from wsecho.runtime.runtime import Runtime

    class Timed(DurableObject):
        async def web_socket_message(self, ws, message):
            async with asyncio.timeout(5):  # needs the current task from the first line
                ws.send(f"timed {message}")

    class TaskPerEvent(Timed):
        eager_handlers = False

    rt = Runtime(
        App(fetch=lambda request, env: Response(""), bindings={"EAGER": Timed, "TASKS": TaskPerEvent}),
        clock=lambda: 0.0,
        wall_clock=lambda: None,
    )
    loop = asyncio.get_running_loop()
    sent = {}
    for binding, cls in (("EAGER", Timed), ("TASKS", TaskPerEvent)):
        host = rt.host(rt.namespaces[binding].id_from_name("x"), cls)
        _client, ws = WebSocketPair()
        DurableObjectState(host).accept_web_socket(ws)
        transport = FakeTransport()
        rt.socket_opened(link_of(ws), transport, "ws://x/", None, "")
        done = loop.create_future()
        loop.call_soon(lambda ws=ws, done=done: (rt.message_received(link_of(ws), "hi"), done.set_result(None)))
        await done
        await rt.barrier(host)
        sent[binding] = transport.frames
    assert sent["TASKS"] == [("message", "timed hi")]
    assert sent["EAGER"] == []
    assert rt.stats.handler_errors["web_socket_message"] == 1
