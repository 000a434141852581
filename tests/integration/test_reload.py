"""A code reload inside a running server, with real clients: the turn that runs finishes on the
old code, what arrives meanwhile is held and goes to the new code, an object that cannot
hibernate keeps its instance and wakes with the new class later, the attachment hook gets
the old version, and new code that cannot replace the old is refused."""

import asyncio
import json
import sys

import pytest
from websockets.asyncio.client import connect

from tests.helpers import until
from wsecho.core.lifecycle import ObjectState
from wsecho.serve.appcode import load_app
from wsecho.serve.config import Settings
from wsecho.serve.server import Server

#: ``VERSION``, ``ATTACHMENT_VERSION`` and ``BINDING`` are filled in per version. A message
#: ``block`` waits for the module's ``GATE``; ``pin`` accepts a non-hibernatable socket.
APP = """\
import asyncio
import json
from urllib.parse import urlsplit

from wsecho import App, DurableObject, Response, WebSocketPair

GATE = asyncio.Event()
UPGRADES = []


class Room(DurableObject):
    attachment_version = {ATTACHMENT_VERSION}

    @classmethod
    def upgrade_attachment(cls, value, from_version):
        UPGRADES.append(from_version)
        return {{**value, "upgraded_from": from_version}}

    def fetch(self, request):
        client, server = WebSocketPair()
        if urlsplit(request.url).query == "pin":
            server.accept()
        else:
            self.ctx.accept_web_socket(server, ["t"])
        server.serialize_attachment({{"v": "{VERSION}"}})
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        if message == "block":
            await GATE.wait()
        ws.send(json.dumps([{VERSION!r}, message, ws.deserialize_attachment()]))


async def worker(request, env):
    return await env.{BINDING}.get_by_name(urlsplit(request.url).path.strip("/")).fetch(request)


app = App(fetch=worker, bindings={{{BINDING!r}: Room}})
"""


def source(version, attachment_version=1, binding="ROOMS"):
    return APP.format(VERSION=version, ATTACHMENT_VERSION=attachment_version, BINDING=binding)


@pytest.fixture
def app_file(tmp_path):
    path = tmp_path / "reload_lab.py"
    path.write_text(source("v1"))
    sys.path.insert(0, str(tmp_path))
    yield path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("reload_lab", None)


@pytest.fixture
def server(app_file, io_loop):
    server = Server(load_app("reload_lab"), Settings(app="reload_lab", port=0, data_dir=":memory:"))
    io_loop.run_sync(server.start)
    yield server
    io_loop.run_sync(server.stop)


async def reply(ws):
    return json.loads(await ws.recv())


@pytest.mark.gen_test
async def test_a_running_turn_ends_on_the_old_code_and_what_arrives_meanwhile_goes_to_the_new(server, app_file):
    url = f"ws://127.0.0.1:{server.port}/lobby"
    async with connect(url) as first, connect(url) as second:
        old = sys.modules["reload_lab"]
        await first.send("block")
        host = server.runtime.find("ROOMS", "lobby")
        await until(lambda: host.lifecycle.current is not None)
        app_file.write_text(source("v2", attachment_version=3))
        reloading = asyncio.ensure_future(server.reloader.reload("test"))
        await until(lambda: sys.modules.get("reload_lab") not in (None, old))  # the new code is imported
        await second.send("hello")  # arrives while the old turn still runs: held
        await until(lambda: server.runtime.stats.messages_in == 2)
        assert not host.lifecycle.queue  # not queued behind the old turn
        old.GATE.set()
        assert await reply(first) == ["v1", "block", {"v": "v1"}]
        assert await reloading is True
        assert await reply(second) == ["v2", "hello", {"v": "v1", "upgraded_from": 1}]
        assert sys.modules["reload_lab"].UPGRADES == [1]
        # The upgraded attachment was stored back: the hook runs once per socket.
        await second.send("again")
        assert await reply(second) == ["v2", "again", {"v": "v1", "upgraded_from": 1}]
        assert sys.modules["reload_lab"].UPGRADES == [1]
        assert server.runtime.stats.snapshot().code_reloads == {"ok": 1, "failed": 0}


@pytest.mark.gen_test
async def test_an_object_that_cannot_hibernate_keeps_its_instance_and_wakes_with_the_new_class(server, app_file):
    server.reloader.timeout = 0.05
    runtime = server.runtime
    async with connect(f"ws://127.0.0.1:{server.port}/pinned") as stays:
        async with connect(f"ws://127.0.0.1:{server.port}/pinned?pin") as pinned:
            await pinned.send("a")
            assert await reply(pinned) == ["v1", "a", {"v": "v1"}]
            host = runtime.find("ROOMS", "pinned")
            app_file.write_text(source("v2"))
            assert await server.reloader.reload("test") is True
            assert host.lifecycle.state is ObjectState.ACTIVE  # the non-hibernatable socket pins it
            await stays.send("b")
            assert await reply(stays) == ["v1", "b", {"v": "v1"}]  # the old instance still serves
        await until(lambda: len(host.sockets) == 1)
        assert runtime.sweep(now=runtime.clock() + 60) == 1
        await stays.send("c")
        assert await reply(stays) == ["v2", "c", {"v": "v1"}]  # the same attachment_version: no upgrade
        assert runtime.find("ROOMS", "pinned") is host


@pytest.mark.gen_test
async def test_new_code_without_a_binding_of_the_old_is_refused_and_the_old_serves(server, app_file):
    async with connect(f"ws://127.0.0.1:{server.port}/lobby") as ws:
        app_file.write_text(source("v2", binding="OTHER"))
        assert await server.reloader.reload("test") is False
        assert "the new code has no binding 'ROOMS'" in server.reloader.failure
        await ws.send("a")
        assert await reply(ws) == ["v1", "a", {"v": "v1"}]
        assert sys.modules["reload_lab"].app.bindings.keys() == {"ROOMS"}  # the old module is back
        readiness = await server.readiness()
        assert readiness.ready
        assert readiness.text.startswith("ready; code reload (test) failed, the previous code serves: ")
