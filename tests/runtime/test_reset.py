"""A reset (``ctx.abort()``) answers the call in hand: its caller gets the reset, never silence."""

import asyncio

import pytest

from tests.helpers import until
from wsecho import App, DurableObject, Request, Response
from wsecho.core.errors import ObjectResetError
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock


class Fragile(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.calls = 0

    async def add(self):
        self.calls += 1
        return self.calls

    async def add_then_abort(self, sync=False):
        self.calls += 1
        if not sync:
            await asyncio.sleep(0)
        self.ctx.abort("asked to")
        return "not this"

    async def fetch(self, request):
        self.ctx.abort("no pages today")
        return Response("not this")


async def route(request, env):
    return await env.FRAGILE.get_by_name("f").fetch(request)


@pytest.fixture
def rt(io_loop):
    clock = FakeClock()
    runtime = Runtime(App(fetch=route, bindings={"FRAGILE": Fragile}), clock=clock.monotonic, wall_clock=clock.now)
    io_loop.run_sync(runtime.start)
    yield runtime
    io_loop.run_sync(runtime.close)


@pytest.mark.gen_test
@pytest.mark.parametrize("sync", [False, True])
async def test_an_rpc_that_aborts_its_object_raises_the_reset_in_the_caller(rt, sync):
    stub = rt.env.FRAGILE.get_by_name("f")
    assert await stub.add() == 1
    with pytest.raises(ObjectResetError, match="asked to"):
        await asyncio.wait_for(stub.add_then_abort(sync=sync), 10)
    assert rt.stats.evictions["abort"] == 1
    assert await stub.add() == 1  # a new instance


@pytest.mark.gen_test
async def test_a_fetch_that_aborts_its_object_raises_the_reset_in_the_caller(rt):
    with pytest.raises(ObjectResetError, match="no pages today"):
        await asyncio.wait_for(rt.fetch(Request("GET", "http://example.com/f")), 10)


class Waiting(DurableObject):
    async def wait(self):
        await self.env.GATE
        return "not this"


@pytest.mark.gen_test
async def test_an_rpc_in_hand_when_its_slot_is_lost_raises_in_the_caller():
    from wsecho.core.placement import slot_of

    gate = asyncio.get_running_loop().create_future()
    clock = FakeClock()
    runtime = Runtime(
        App(fetch=route, bindings={"WAITING": Waiting}, vars={"GATE": gate}),
        clock=clock.monotonic,
        wall_clock=clock.now,
    )
    await runtime.start()
    try:
        stub = runtime.env.WAITING.get_by_name("w")
        call = asyncio.ensure_future(stub.wait())
        await until(lambda: (h := runtime.find("WAITING", "w")) is not None and h.lifecycle.current is not None)
        host = runtime.find("WAITING", "w")
        assert runtime.drop_slots({slot_of(host.id.hex)}, "its lease was lost") == 1
        with pytest.raises(ObjectResetError, match="its lease was lost"):
            await asyncio.wait_for(call, 10)
    finally:
        gate.cancel()
        await runtime.close()
