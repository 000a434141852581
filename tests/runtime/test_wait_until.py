"""``ctx.wait_until(awaitable)``: what it refuses, and that work which fails is counted and
logged, never lost silently."""

import asyncio
import logging

import pytest

from tests.helpers import until
from wsecho import App, DurableObject, Response
from wsecho.core.errors import InvalidArgumentError
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock


class Later(DurableObject):
    def not_awaitable(self):
        self.ctx.wait_until(42)

    def failing(self):
        async def fail():
            await asyncio.sleep(0)
            raise LookupError("the work failed")

        self.ctx.wait_until(fail())
        return "started"


async def route(request, env):
    return Response("no")


@pytest.fixture
def rt(io_loop):
    clock = FakeClock()
    runtime = Runtime(App(fetch=route, bindings={"L": Later}), clock=clock.monotonic, wall_clock=clock.now)
    io_loop.run_sync(runtime.start)
    yield runtime
    io_loop.run_sync(runtime.close)


@pytest.mark.gen_test
async def test_wait_until_refuses_what_is_not_awaitable_naming_it(rt):
    with pytest.raises(InvalidArgumentError, match="wait_until\\(\\) takes an awaitable, got int"):
        await rt.env.L.get_by_name("a").not_awaitable()


@pytest.mark.gen_test
async def test_work_that_fails_is_counted_and_logged_and_the_object_may_hibernate_again(rt, caplog):
    caplog.set_level(logging.ERROR, logger="wsecho")
    assert await rt.env.L.get_by_name("a").failing() == "started"
    host = rt.find("L", "a")
    await until(lambda: rt.stats.handler_errors["wait_until"] > 0)
    assert rt.stats.handler_errors["wait_until"] == 1
    (record,) = [r for r in caplog.records if "wait_until() work of Later" in r.getMessage()]
    assert record.getMessage().endswith("raised")
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], LookupError)
    assert rt.hibernation_blocker(host) is None  # the pin went with the work
