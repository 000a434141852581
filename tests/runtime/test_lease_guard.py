"""A cluster member acts for an object only while it can prove the lease of its slot
(docs/scaling-out.md, "Proof before acting"), also inside a turn that was already running: a
process paused past its lease (SIGSTOP, a long GC or VM pause) resumes a suspended handler
only to unwind it, and delivers nothing more that was queued."""

import asyncio
import gc

import pytest

from tests.helpers import FakeTransport, until
from wsecho import App, DurableObject, Response, WebSocketPair
from wsecho.api.objects import DurableObjectState
from wsecho.api.websocket import link_of
from wsecho.core.errors import NotOwnerError, ObjectResetError
from wsecho.core.placement import slot_of
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock


class Lease:
    """An Ownership whose one lease the test takes away (as the proof running out would)."""

    def __init__(self) -> None:
        self.held = True

    def is_local(self, hex_id: str) -> bool:
        return self.held

    def owner(self, hex_id: str) -> None:
        return None


class Worker(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.seen = env.SEEN
        env.BUILT.append(ctx.id.name)

    async def wait(self):
        self.seen.append("wait started")
        try:
            await self.env.GATE
        except ObjectResetError as exc:
            self.seen.append(f"unwound: {exc}")
            raise
        self.seen.append("went on after the await")
        return "not this"

    async def lose_then_return(self):
        """The sync tail of a turn during which the lease ran out (a pause there)."""
        self.seen.append("lose_then_return")
        self.env.LEASE.held = False
        return "done"

    async def count(self):
        self.seen.append("count")
        return len(self.seen)

    def web_socket_message(self, ws, message):
        self.seen.append(f"message {message}")

    def gate(self):
        """A sync method whose result is an awaitable that is no coroutine (a future)."""
        return self.env.GATE


class LazyWorker(Worker):
    eager_handlers = False


async def route(request, env):
    return Response("no")


@pytest.fixture
def make_runtime(io_loop):
    made = []

    async def make(cls):
        lease, seen = Lease(), []
        gate = asyncio.get_running_loop().create_future()
        clock = FakeClock()
        runtime = Runtime(
            App(
                fetch=route,
                bindings={"W": cls},
                vars={
                    "GATE": gate,
                    "SEEN": seen,
                    "LEASE": lease,
                    "OTHER": asyncio.get_running_loop().create_future(),
                    "BUILT": [],
                },
            ),
            clock=clock.monotonic,
            wall_clock=clock.now,
            placement=lease,
            guard_events=True,
        )
        await runtime.start()
        made.append((runtime, gate))
        return runtime, lease, gate, seen

    yield make
    for runtime, gate in made:
        gate.cancel()
        io_loop.run_sync(runtime.close)


@pytest.mark.gen_test
@pytest.mark.parametrize("cls", [Worker, LazyWorker])
async def test_a_handler_suspended_when_the_lease_runs_out_is_resumed_only_to_unwind(make_runtime, cls):
    runtime, lease, gate, seen = await make_runtime(cls)
    call = asyncio.ensure_future(runtime.env.W.get_by_name("a").wait())
    await until(lambda: seen == ["wait started"])
    host = runtime.find("W", "a")
    lease.held = False  # the proof ran out while the handler waited (the process was paused)
    gate.set_result(None)  # what it waited for arrives as the process resumes
    with pytest.raises(ObjectResetError, match="no longer holds the lease of slot"):
        await asyncio.wait_for(call, 10)
    assert seen[1:] == [
        f"unwound: {cls.__name__} {host.id} was reset: this process no longer holds the lease of slot {slot_of(host.id.hex)}"
    ]
    assert runtime.find("W", "a") is None  # the slot's objects were dropped
    assert runtime.stats.evictions["lease"] == 1


@pytest.mark.gen_test
async def test_an_event_queued_behind_a_turn_during_which_the_lease_ran_out_is_not_delivered(make_runtime):
    runtime, _lease, gate, seen = await make_runtime(Worker)
    unhandled = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
    stub = runtime.env.W.get_by_name("a")
    first = asyncio.ensure_future(stub.wait())
    await until(lambda: seen == ["wait started"])
    second = asyncio.ensure_future(stub.lose_then_return())
    third = asyncio.ensure_future(stub.count())
    await until(lambda: len(runtime.find("W", "a").lifecycle.queue) == 2)
    gate.set_result(None)  # the first turn ends normally; the second ends after losing the lease
    assert await asyncio.wait_for(first, 10) == "not this"
    assert await asyncio.wait_for(second, 10) == "done"
    with pytest.raises(ObjectResetError, match="no longer holds the lease of slot"):
        await asyncio.wait_for(third, 10)
    assert seen == ["wait started", "went on after the await", "lose_then_return"]
    with pytest.raises(NotOwnerError):
        await stub.count()  # and nothing new reaches it here
    gc.collect()  # a task that failed and that nobody awaited reports it when it is freed
    assert unhandled == []


@pytest.mark.gen_test
async def test_a_handler_that_returns_a_future_is_awaited_as_it_is(make_runtime):
    runtime, _lease, gate, _seen = await make_runtime(Worker)
    call = asyncio.ensure_future(runtime.env.W.get_by_name("a").gate())
    await asyncio.sleep(0)
    gate.set_result("the gate's value")
    assert await asyncio.wait_for(call, 10) == "the gate's value"


@pytest.mark.gen_test
async def test_while_the_lease_holds_a_suspended_handler_goes_on(make_runtime):
    runtime, _lease, gate, seen = await make_runtime(LazyWorker)
    call = asyncio.ensure_future(runtime.env.W.get_by_name("a").wait())
    await until(lambda: seen == ["wait started"])
    gate.set_result(None)
    assert await asyncio.wait_for(call, 10) == "not this"
    assert seen == ["wait started", "went on after the await"]


class Background(Worker):
    async def start_background(self):
        async def later():
            self.seen.append("background waiting")
            try:
                await asyncio.shield(self.env.GATE)  # the gate stays usable for the test
            except asyncio.CancelledError:
                self.seen.append("background cancelled")
                raise
            self.seen.append("background went on")

        self.ctx.wait_until(later())
        self.ctx.wait_until(self.env.OTHER)  # someone else's future: only waited for
        return "started"


@pytest.mark.gen_test
@pytest.mark.parametrize("how", ["lease", "abort"])
async def test_the_wait_until_work_of_a_dropped_instance_goes_with_it(make_runtime, how):
    runtime, _lease, gate, seen = await make_runtime(Background)
    other = runtime.env.OTHER
    stub = runtime.env.W.get_by_name("a")
    assert await stub.start_background() == "started"
    await until(lambda: "background waiting" in seen)
    host = runtime.find("W", "a")
    if how == "lease":
        runtime.drop_slots({slot_of(host.id.hex)}, "their lease could not be renewed in time")
    else:
        runtime.abort(host, "asked to")
    await until(lambda: "background cancelled" in seen)
    gate.set_result(None)
    await asyncio.sleep(0)
    assert "background went on" not in seen
    assert not other.cancelled()  # a future the instance did not make is left alone
    assert not host.own_work  # and nothing keeps the cancelled task
    other.set_result(None)
    await until(lambda: not host.lifecycle.pins)  # each piece of work unpinned the object as it ended


@pytest.mark.gen_test
async def test_finished_wait_until_work_is_not_kept(make_runtime):
    runtime, _lease, gate, seen = await make_runtime(Background)
    assert await runtime.env.W.get_by_name("a").start_background() == "started"
    host = runtime.find("W", "a")
    assert len(host.own_work) == 1  # the coroutine's task (the other is someone else's future)
    gate.set_result(None)
    await until(lambda: "background went on" in seen)
    await asyncio.sleep(0)
    assert not host.own_work  # bounded: done work is forgotten


@pytest.mark.gen_test
async def test_what_arrives_after_the_lease_ran_out_reaches_nothing_and_closes_with_1012(make_runtime):
    runtime, lease, _gate, seen = await make_runtime(Worker)
    host = runtime.host(runtime.env.W.id_from_name("a"), Worker)
    _client, ws = WebSocketPair()
    DurableObjectState(host).accept_web_socket(ws)
    link, transport = link_of(ws), FakeTransport()
    runtime.socket_opened(link, transport, "ws://x/", None, "")
    runtime.message_received(link, "before")
    assert seen == ["message before"]
    lease.held = False  # the proof ran out; the next thing that arrives finds it gone
    runtime.message_received(link, "after")
    blocked = runtime.block_concurrency_while(host, lambda: None)  # outside a turn: one of its own
    await asyncio.sleep(0)
    assert seen == ["message before"]  # neither reached the object
    assert runtime.env.BUILT == ["a"]  # nor woke it: no instance was built without the proof
    assert transport.frames[-1] == ("close", 1012, "Service Restart: the object moved; reconnect")
    assert runtime.find("W", "a") is None
    with pytest.raises(ObjectResetError, match="no longer holds the lease of slot"):
        await asyncio.wait_for(blocked, 10)


class SlowToWake(Worker):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)

        async def load():
            self.seen.append("loading")
            try:
                await asyncio.shield(env.GATE)
            except asyncio.CancelledError:
                self.seen.append("loading cancelled")
                raise

        ctx.block_concurrency_while(load)  # Cloudflare's way to load state before any event


@pytest.mark.gen_test
async def test_a_slot_lost_while_an_object_wakes_drops_it_and_its_constructors_work(make_runtime):
    runtime, _lease, gate, seen = await make_runtime(SlowToWake)
    call = asyncio.ensure_future(runtime.env.W.get_by_name("a").count())
    await until(lambda: seen == ["loading"])
    host = runtime.find("W", "a")
    assert runtime.drop_slots({slot_of(host.id.hex)}, "their lease could not be renewed in time") == 1
    with pytest.raises(ObjectResetError, match="their lease could not be renewed in time"):
        await asyncio.wait_for(call, 10)
    await until(lambda: "loading cancelled" in seen)
    gate.set_result(None)
    await asyncio.sleep(0)
    assert seen == ["loading", "loading cancelled"]  # the queued call never ran
    assert runtime.find("W", "a") is None
