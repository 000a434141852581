"""Reloading the application's code in a real ``python -m wsecho`` process (``--reload-code``
on SIGHUP, ``--reload``, ``--workers 2``): the file on disk changes, the WebSockets stay open,
no message is lost, and the replies come from the new code with the tags, attachments and
storage of before."""

import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect

from tests.helpers import ServerProcess

#: The application. It imports its version from a module of its own (``reloadable_text``),
#: so a reload must import that module afresh too.
APP = """\
import asyncio
import json
from urllib.parse import parse_qs, urlsplit

import reloadable_text
from wsecho import App, DurableObject, Response, WebSocketPair


class Room(DurableObject):
    attachment_version = reloadable_text.ATTACHMENT_VERSION

    @classmethod
    def upgrade_attachment(cls, value, from_version):
        return reloadable_text.upgrade(value, from_version)

    def fetch(self, request):
        query = parse_qs(urlsplit(request.url).query)
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server, query["tags"][0].split(","))
        server.serialize_attachment({"name": query["name"][0]})
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        count = (await self.ctx.storage.get("count") or 0) + 1
        await self.ctx.storage.put("count", count)
        await asyncio.sleep(0)  # a turn that awaits: a reload must let it finish
        ws.send(json.dumps({
            "version": reloadable_text.VERSION,
            "echo": message,
            "count": count,
            "tags": self.ctx.get_tags(ws),
            "attachment": ws.deserialize_attachment(),
        }))


async def worker(request, env):
    room = urlsplit(request.url).path.strip("/")
    return await env.ROOMS.get_by_name(room).fetch(request)


app = App(fetch=worker, bindings={"ROOMS": Room})
"""

TEXT_V1 = """\
VERSION = "v1"
ATTACHMENT_VERSION = 0


def upgrade(value, from_version):
    return value
"""

TEXT_V2 = """\
VERSION = "v2"
ATTACHMENT_VERSION = 2


def upgrade(value, from_version):
    return {**value, "upgraded_from": from_version}
"""

#: A version whose import fails.
TEXT_BROKEN = TEXT_V2 + '\nraise RuntimeError("the new code is broken")\n'

RELOADED = r"code reloaded \(SIGHUP\)"


@pytest.fixture
def app_dir(tmp_path):
    path = tmp_path / "app"
    path.mkdir()
    (path / "reloadable.py").write_text(APP)
    (path / "reloadable_text.py").write_text(TEXT_V1)
    return path


@pytest.fixture
def serve(app_dir, tmp_path):
    started = []

    def start(*args, server_class=ServerProcess):
        server = server_class(
            ["reloadable:app", "--port", "0", "--data-dir", str(tmp_path / "data"), *args], cwd=app_dir
        )
        started.append(server)
        return server.ready()

    yield start
    for server in started:
        server.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def wait_line(server, pattern, timeout=20.0):
    """``server.wait_for`` without blocking the event loop (the clients keep going meanwhile)."""
    return await asyncio.to_thread(server.wait_for, pattern, timeout)


def write(path, text):
    path.write_text(text)


class Client:
    """One socket that sends numbered messages and checks that each reply answers the next."""

    def __init__(self, ws, name):
        self.ws = ws
        self.name = name
        self.sent = 0
        self.replies = []

    async def send(self):
        await self.ws.send(f"{self.name}-{self.sent}")
        self.sent += 1

    async def receive(self):
        reply = json.loads(await self.ws.recv())
        assert reply["echo"] == f"{self.name}-{len(self.replies)}"  # in order, none lost
        self.replies.append(reply)
        return reply

    async def exchange(self):
        await self.send()
        return await self.receive()

    def versions(self):
        return [r["version"] for r in self.replies]


async def join(port, room, name, tags):
    ws = await connect(f"ws://127.0.0.1:{port}/{room}?name={name}&tags={tags}")
    return Client(ws, name)


async def traffic(clients, until, window=8):
    """Every client keeps ``window`` messages in flight (its object is never idle) until
    ``until(client)`` is true, then reads the replies still due."""

    async def one(client):
        while not until(client):
            while client.sent - len(client.replies) < window:
                await client.send()
            await client.receive()
        while len(client.replies) < client.sent:
            await client.receive()

    await asyncio.gather(*(one(c) for c in clients))


def admin_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_sighup_reloads_the_code_mid_traffic_without_closing_a_socket_or_losing_a_message(serve, app_dir):
    server = serve("--reload-code", "on")

    async def scenario():
        clients = [await join(server.port, "lobby", f"c{i}", f"t{i},all") for i in range(4)]
        await traffic(clients, lambda c: len(c.replies) >= 10)
        # The clients keep sending while the file changes and the signal arrives.
        sending = asyncio.ensure_future(traffic(clients, lambda c: c.versions().count("v2") >= 10))
        write(app_dir / "reloadable_text.py", TEXT_V2)
        os.kill(server.proc.pid, signal.SIGHUP)
        await wait_line(server, RELOADED)
        await sending
        for c in clients:
            assert c.ws.close_code is None  # never closed
            versions = c.versions()
            switch = versions.index("v2")
            assert versions == ["v1"] * switch + ["v2"] * (len(versions) - switch)
            last = c.replies[-1]
            assert last["tags"] == [c.name.replace("c", "t"), "all"]
            assert last["attachment"] == {"name": c.name, "upgraded_from": 0}
        counts = sorted(r["count"] for c in clients for r in c.replies)
        assert counts == list(range(1, len(counts) + 1))  # storage carried over, every message counted
        for c in clients:
            await c.ws.close()

    run(scenario())


def test_a_failed_import_keeps_the_old_code_and_says_why_in_the_log_and_on_readyz(serve, app_dir):
    server = serve("--reload-code", "on", "--admin-port", "0")
    admin = int(server.wait_for(r"admin listener on http://127\.0\.0\.1:(\d+) ").group(1))

    async def scenario():
        client = await join(server.port, "lobby", "c0", "a")
        assert (await client.exchange())["version"] == "v1"
        write(app_dir / "reloadable_text.py", TEXT_BROKEN)
        os.kill(server.proc.pid, signal.SIGHUP)
        failed = await wait_line(server, r"code reload \(SIGHUP\) failed, the previous code serves: (.*)")
        assert "RuntimeError: the new code is broken" in failed.group(1)
        await wait_line(server, r"Traceback")  # the traceback follows the line
        assert (await client.exchange())["version"] == "v1"
        status, text = await asyncio.to_thread(admin_get, admin, "/readyz")
        assert status == 200
        assert text.startswith("ready; code reload (SIGHUP) failed")
        assert "the new code is broken" in text
        metrics = (await asyncio.to_thread(admin_get, admin, "/metrics"))[1]
        assert 'wsecho_code_reloads_total{result="failed"} 1.0' in metrics
        # Fixed: the next SIGHUP loads it, and /readyz says plain "ready" again.
        write(app_dir / "reloadable_text.py", TEXT_V2)
        os.kill(server.proc.pid, signal.SIGHUP)
        await wait_line(server, RELOADED)
        reply = await client.exchange()
        assert reply["version"] == "v2"
        assert reply["attachment"] == {"name": "c0", "upgraded_from": 0}
        assert await asyncio.to_thread(admin_get, admin, "/readyz") == (200, "ready\n")
        metrics = (await asyncio.to_thread(admin_get, admin, "/metrics"))[1]
        assert 'wsecho_code_reloads_total{result="ok"} 1.0' in metrics
        assert client.ws.close_code is None
        await client.ws.close()

    run(scenario())


def test_reload_on_picks_up_a_changed_file(serve, app_dir):
    server = serve("--reload", "on")

    async def scenario():
        client = await join(server.port, "lobby", "c0", "a")
        assert (await client.exchange())["version"] == "v1"
        write(app_dir / "reloadable_text.py", TEXT_V2)
        changed = await wait_line(server, r"(\S+) changed: reloading the application's code")
        assert changed.group(1).endswith("reloadable_text.py")
        await wait_line(server, r"code reloaded \(reloadable_text\.py changed\)")
        assert (await client.exchange())["version"] == "v2"
        assert client.ws.close_code is None
        await client.ws.close()

    run(scenario())


def test_every_worker_reloads_its_own_objects(app_dir, tmp_path):
    from tests.system.test_workers import Workers

    # The workers run from the repository (their class sets cwd); the app comes from PYTHONPATH.
    args = ["reloadable:app", "--data-dir", str(tmp_path / "data"), "--reload-code", "on"]
    server = Workers(args, env={"PYTHONPATH": str(app_dir)})
    try:
        server.ready()
        assert run(reload_every_worker(server, app_dir)) == {"0", "1"}
    finally:
        server.stop()


async def reload_every_worker(server, app_dir):
    # Rooms owned by both workers (a connection moves to its room's owner).
    clients = [await join(server.port, f"room{i}", f"c{i}", "a") for i in range(8)]
    await traffic(clients, lambda c: len(c.replies) >= 3)
    write(app_dir / "reloadable_text.py", TEXT_V2)
    os.kill(server.proc.pid, signal.SIGHUP)
    workers = set()
    while len(workers) < 2:
        line = await wait_line(server, r"worker (\d+).*code reloaded \(SIGHUP\)|code reloaded \(SIGHUP\).*worker (\d+)")
        workers.add(line.group(1) or line.group(2))
    await traffic(clients, lambda c: c.versions()[-1] == "v2")
    for c in clients:
        assert c.ws.close_code is None
        assert c.replies[-1]["attachment"] == {"name": c.name, "upgraded_from": 0}
        await c.ws.close()
    return workers


def test_the_application_modules_are_the_apps_own(app_dir):
    """What a reload imports again: the app and the modules it loaded from its directory,
    never wsecho or installed packages; a failed import puts the old modules back."""
    from wsecho.serve import appcode

    sys.path.insert(0, str(app_dir))
    try:
        appcode.load_app("reloadable:app")
        names = set(appcode.app_modules("reloadable:app"))
        assert names == {"reloadable", "reloadable_text"}
        assert [p.name for p in appcode.source_files("reloadable:app")] == ["reloadable.py", "reloadable_text.py"]
        old = appcode.app_modules("reloadable:app")
        write(app_dir / "reloadable_text.py", TEXT_BROKEN)
        with pytest.raises(appcode.AppLoadError, match="the new code is broken"):
            appcode.reimport("reloadable:app")
        assert {n: sys.modules[n] for n in names} == old  # the old modules are back
        write(app_dir / "reloadable_text.py", TEXT_V2)
        new = appcode.reimport("reloadable:app")
        assert new.bindings["ROOMS"].attachment_version == 2
        assert sys.modules["reloadable_text"] is not old["reloadable_text"]
    finally:
        sys.path.remove(str(app_dir))
        for name in ("reloadable", "reloadable_text"):
            sys.modules.pop(name, None)
