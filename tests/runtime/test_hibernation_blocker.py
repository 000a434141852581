"""``Runtime.hibernation_blocker``: the one answer to "can this object hibernate now" (the
sweep, ``ctx.hibernate_now()``, a code reload, eviction and ``/objects`` use it), naming what
only the runtime knows: ``block_concurrency_while()`` work and writes being committed."""

import asyncio

import pytest

from tests.helpers import until
from wsecho import App, DurableObject, Response
from wsecho.backends.base import MemoryBackend
from wsecho.core.lifecycle import ObjectState
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock


class GatedBackend(MemoryBackend):
    """Commits wait for the test's gate: a turn's writes stay "being committed"."""

    def __init__(self, gate: asyncio.Future[None]) -> None:
        super().__init__()
        self.gate = gate

    async def commit(self, batches):
        await asyncio.shield(self.gate)
        return await super().commit(batches)


class Blocked(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        if ctx.id.name == "waking":
            ctx.block_concurrency_while(lambda: asyncio.shield(env.GATE))

    async def write(self):
        await self.ctx.storage.put("k", "v")
        return "written"

    async def later_block(self):
        async def blocker():
            await self.ctx.block_concurrency_while(lambda: asyncio.shield(self.env.GATE))

        self.ctx.wait_until(blocker())
        return "later"


async def route(request, env):
    return Response("no")


@pytest.fixture
def rt(io_loop):
    gate = io_loop.asyncio_loop.create_future()
    clock = FakeClock()
    runtime = Runtime(
        App(fetch=route, bindings={"B": Blocked}, vars={"GATE": gate}),
        clock=clock.monotonic,
        wall_clock=clock.now,
        backend=GatedBackend(gate),
    )
    io_loop.run_sync(runtime.start)
    yield runtime, gate
    if not gate.done():
        gate.set_result(None)
    io_loop.run_sync(runtime.close)


@pytest.mark.gen_test
async def test_a_constructors_block_concurrency_while_is_named(rt):
    runtime, gate = rt
    call = asyncio.ensure_future(runtime.env.B.get_by_name("waking").write())
    await until(lambda: (h := runtime.find("B", "waking")) is not None and h.lifecycle.state is ObjectState.WAKING)
    host = runtime.find("B", "waking")
    await until(lambda: bool(host.blockers))
    assert runtime.hibernation_blocker(host) == "block_concurrency_while() in its constructor is running"
    gate.set_result(None)
    assert await asyncio.wait_for(call, 10) == "written"


@pytest.mark.gen_test
async def test_block_concurrency_while_outside_a_turn_is_named(rt):
    runtime, gate = rt
    assert await runtime.env.B.get_by_name("b").later_block() == "later"
    host = runtime.find("B", "b")
    await until(lambda: host.lifecycle.current is not None)
    assert runtime.hibernation_blocker(host) == "block_concurrency_while() is running"
    gate.set_result(None)
    await until(lambda: runtime.hibernation_blocker(host) is None)


@pytest.mark.gen_test
async def test_writes_being_committed_are_named(rt):
    runtime, gate = rt
    call = asyncio.ensure_future(runtime.env.B.get_by_name("w").write())
    await until(lambda: (h := runtime.find("B", "w")) is not None and h.storage is not None and h.storage.in_flight())
    host = runtime.find("B", "w")
    assert runtime.hibernation_blocker(host) == "the writes of its write turn are being committed"
    gate.set_result(None)
    assert await asyncio.wait_for(call, 10) == "written"
    assert runtime.hibernation_blocker(host) is None
