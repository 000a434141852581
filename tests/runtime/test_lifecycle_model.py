"""A hypothesis state machine drives the runtime's lifecycle against a simple model.

Sockets open, send, close from either side and drop; sweeps run at arbitrary times;
wakes fail when the test says so. Invariants: one final event per socket at most (and
exactly one when no wake of its object failed), messages delivered in order without
loss or duplication (unless a failed wake dropped them, which is then reported), events
per object in arrival order, and never two instances of one object.
"""

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.helpers import FakeTransport
from wsecho import App, DurableObject, Response, WebSocketPair
from wsecho.api.objects import DurableObjectState
from wsecho.api.websocket import link_of
from wsecho.core.lifecycle import SocketState
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock


class Model(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        world = env.WORLD
        host = world.runtime.find("OBJ", ctx.id.name)
        # never two instances of one object
        assert host is None or host.instance is None, "a second instance while one is alive"
        world.constructions[ctx.id.name] = world.constructions.get(ctx.id.name, 0) + 1
        if world.fail_wakes:
            world.failed_wakes.add(ctx.id.name)
            raise RuntimeError("wake fails on purpose")

    def _check_current(self):
        host = self.env.WORLD.runtime.find("OBJ", self.ctx.id.name)
        assert host.instance is self, "an event reached an instance that is not the current one"

    def web_socket_message(self, ws, message):
        self._check_current()
        world = self.env.WORLD
        world.delivered.setdefault(id(ws), []).append(message)
        world.order.setdefault(self.ctx.id.name, []).append(message)
        if message.startswith("close"):
            ws.close(4000, "asked")
        if message.startswith("wait"):
            return self._wait(world)  # a turn that suspends: later events queue behind it
        return None

    async def _wait(self, world):
        await world.gate
        self._check_current()

    def web_socket_close(self, ws, code, reason, was_clean):
        self._check_current()
        self.env.WORLD.finals.setdefault(id(ws), []).append(("close", code))

    def web_socket_error(self, ws, error):
        self._check_current()
        self.env.WORLD.finals.setdefault(id(ws), []).append(("error", error.code))


class World:
    def __init__(self):
        self.gate = None
        self.fail_wakes = False
        self.failed_wakes = set()
        self.constructions = {}
        self.delivered = {}
        self.finals = {}
        self.order = {}
        self.runtime = None


def _fetch(request, env):
    return Response("unused")


class LifecycleMachine(RuleBasedStateMachine):
    """Every rule runs inside an event loop, so that suspended turns and queues are real."""

    @initialize()
    def setup(self):
        self.loop = asyncio.new_event_loop()
        self.world = World()
        self.world.gate = self.loop.create_future()
        self.clock = FakeClock()
        app = App(fetch=_fetch, bindings={"OBJ": Model}, vars={"WORLD": self.world})
        self.rt = Runtime(app, clock=self.clock.monotonic, wall_clock=lambda: None, hibernate_after=10)
        self.world.runtime = self.rt
        self.sockets = []  # [ws, object name, messages sent, connection alive]
        self.sent_order = {}
        self.seq = 0

    def teardown(self):
        if not hasattr(self, "loop"):
            return
        for _ in range(10):  # bounded: each round releases the turns that started in the last
            self.release()
            if not asyncio.all_tasks(self.loop):
                break
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def _in_loop(self, fn, *args):
        async def step():
            fn(*args)
            await asyncio.sleep(0)

        self.loop.run_until_complete(step())

    @rule()
    def release(self):
        """Let every suspended turn finish, then give the loop a few turns to deliver the queues."""
        gate, self.world.gate = self.world.gate, self.loop.create_future()
        gate.set_result(None)
        for _ in range(20):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(name=st.sampled_from(["a", "b"]))
    def open_socket(self, name):
        self._in_loop(self._open_socket, name)

    def _open_socket(self, name):
        ns = self.rt.namespaces["OBJ"]
        host = self.rt.host(ns.id_from_name(name), Model)
        _client, ws = WebSocketPair()
        DurableObjectState(host).accept_web_socket(ws)
        link = link_of(ws)
        self.rt.socket_opened(link, FakeTransport(), "ws://x/", None, "")
        self.sockets.append([link, name, [], True])

    def _live(self):
        return [s for s in self.sockets if s[3]]

    @precondition(
        lambda self: any(s[3] and s[0].state in (SocketState.OPEN, SocketState.CLOSE_SENT) for s in self.sockets)
    )
    @rule(data=st.data(), kind=st.sampled_from(["m", "close", "wait"]))
    def message(self, data, kind):
        candidates = [s for s in self._live() if s[0].state in (SocketState.OPEN, SocketState.CLOSE_SENT)]
        sock = data.draw(st.sampled_from(candidates))
        self.seq += 1
        text = f"{kind}{self.seq}"
        sock[2].append(text)
        self.sent_order.setdefault(sock[1], []).append(text)
        self._in_loop(self.rt.message_received, sock[0], text)

    @precondition(
        lambda self: any(s[3] and s[0].state in (SocketState.OPEN, SocketState.CLOSE_SENT) for s in self.sockets)
    )
    @rule(data=st.data(), code=st.sampled_from([None, 1000, 4001]))
    def peer_close(self, data, code):
        candidates = [s for s in self._live() if s[0].state in (SocketState.OPEN, SocketState.CLOSE_SENT)]
        sock = data.draw(st.sampled_from(candidates))
        self._in_loop(self.rt.peer_closed, sock[0], code, "")
        if sock[0].state in (SocketState.CLOSED, SocketState.LOST):
            self._lose(sock)  # the handshake finished: the connection ends

    @precondition(lambda self: any(s[3] for s in self.sockets))
    @rule(data=st.data())
    def drop(self, data):
        self._lose(data.draw(st.sampled_from(self._live())))

    def _lose(self, sock):
        sock[3] = False
        self._in_loop(self.rt.transport_lost, sock[0])

    @rule(seconds=st.floats(min_value=0, max_value=30))
    def sweep(self, seconds):
        self.clock.advance(seconds)
        self._in_loop(self.rt.sweep)

    @rule(fail=st.booleans())
    def wakes_fail(self, fail):
        self.world.fail_wakes = fail

    @invariant()
    def at_most_one_final_event_per_socket(self):
        for link, name, sent, _alive in getattr(self, "sockets", []):
            ws = link.ws
            finals = self.world.finals.get(id(ws), [])
            assert len(finals) <= 1, f"{len(finals)} final events for one socket"
            delivered = self.world.delivered.get(id(ws), [])
            # delivered in order, never duplicated: a subsequence of what was sent
            it = iter(sent)
            assert all(m in it for m in delivered), "messages out of order or duplicated"
            if name not in self.world.failed_wakes:
                # no wake of this object failed: nothing may be lost
                assert delivered == sent[: len(delivered)]
                if link.state in (SocketState.CLOSED, SocketState.LOST) and link not in self._sockets_of(name):
                    assert len(finals) == 1, "a finished socket without its final event"

    def _sockets_of(self, name):
        host = self.rt.find("OBJ", name)
        return host.sockets if host is not None else {}

    @invariant()
    def events_per_object_in_arrival_order(self):
        for name, seen in getattr(self, "world", World()).order.items():
            it = iter(self.sent_order.get(name, []))
            assert all(m in it for m in seen)


LifecycleMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLifecycle = LifecycleMachine.TestCase
