"""The workers' mesh in one process: two Servers as workers 0 and 1 of ``--workers 2``, each
with its real mesh (Unix sockets in a temporary directory), real clients on their ports.

The same code runs in the worker processes of ``wsecho --workers N`` (tests/system/test_workers.py
runs those); here each path can be pointed at directly: which worker a client reaches is
the test's choice.
"""

import asyncio
import contextlib
import json
import logging
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.apps import workers_app
from wsecho import App
from wsecho.api.objects import DurableObjectNamespace
from wsecho.core.errors import InvalidStateError
from wsecho.core.placement import Placement
from wsecho.serve.config import Settings
from wsecho.serve.mesh import MeshClient, MeshServer
from wsecho.serve.metrics import render
from wsecho.serve.server import Server
from wsecho.serve.worker import handlers

ROOM = DurableObjectNamespace("ROOM", workers_app.Caller, router=None)  # type: ignore[arg-type]


def owned_by(worker: int, prefix: str, count: int = 2) -> str:
    """The first name ``prefix0``, ``prefix1``, ... whose object worker ``worker`` owns."""
    placement = Placement(0, count)
    for i in range(1000):
        if placement.owner(ROOM.id_from_name(f"{prefix}{i}").hex) == worker:
            return f"{prefix}{i}"
    raise AssertionError("no name found")


@contextlib.asynccontextmanager
async def two_workers(tmp_path, apps=(workers_app.app, workers_app.app), owner_wait=5.0, start=(0, 1)):
    servers: dict[int, Server] = {}
    mesh_servers: list[MeshServer] = []
    meshes: list[MeshClient] = []
    try:
        for i in start:
            mesh = MeshClient(tmp_path, i, owner_wait=owner_wait)
            meshes.append(mesh)
            server = Server(
                apps[i], Settings(port=0, data_dir=":memory:"), placement=Placement(i, len(apps)), mesh=mesh
            )
            await server.start()
            mesh_server = MeshServer(tmp_path, i)
            await mesh_server.start(handlers(server), server.adopt)
            servers[i] = server
            mesh_servers.append(mesh_server)
        yield servers
    finally:
        for server in servers.values():
            await server.stop(timeout=1)
        for mesh in meshes:
            mesh.close()
        for mesh_server in mesh_servers:
            await mesh_server.close()


def get(port: int, path: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


async def aget(port: int, path: str) -> tuple[int, str, dict[str, str]]:
    return await asyncio.get_running_loop().run_in_executor(None, get, port, path)


@pytest.mark.gen_test(timeout=30)
async def test_an_upgrade_that_reaches_the_wrong_worker_is_served_by_the_owner(tmp_path):
    name = owned_by(1, "room")
    async with two_workers(tmp_path) as servers:
        first, second = servers[0], servers[1]
        # Reached through worker 0, served by worker 1: the one object holds both sockets.
        a = await connect(f"ws://127.0.0.1:{first.port}/room/{name}")
        b = await connect(f"ws://127.0.0.1:{second.port}/room/{name}")
        for ws in (a, b):
            await ws.send("inc")
        assert sorted([await asyncio.wait_for(a.recv(), 5), await asyncio.wait_for(b.recv(), 5)]) == [
            "ack 1",
            "ack 2",
        ]
        await a.send("bytes past the handshake come along")
        assert await asyncio.wait_for(a.recv(), 5) == "bytes past the handshake come along"
        assert first.runtime.socket_count() == 0
        assert second.runtime.socket_count() == 2
        assert first.runtime.hosts() == []  # never constructed where it is not owned
        out, into = render(first.registry).decode(), render(second.registry).decode()
        assert 'wsecho_connections_moved_total{direction="out"} 1.0' in out
        assert 'wsecho_connections_moved_total{direction="in"} 1.0' in into
        status, body, _ = await aget(first.port, f"/room/{name}")  # a plain request goes by message
        assert status == 200
        assert body.split()[2:] == ["2", "2"]
        await a.close()
        await b.close()


@pytest.mark.gen_test(timeout=30)
async def test_rpc_to_another_workers_object_copies_values_and_names_what_cannot_cross(tmp_path):
    caller, callee = owned_by(0, "caller"), owned_by(1, "callee")
    async with two_workers(tmp_path) as servers:
        status, body, _ = await aget(servers[0].port, f"/rpc/{caller}/{callee}")
        assert status == 200, body
        report = json.loads(body)
        # Values cross as the storage codec carries them: a tuple comes back as a list.
        assert report["add"] == {"sum": 6, "pid": report["add"]["pid"], "blob": "00ff", "tuple": [1, 2]}
        assert report["fail"] == "LookupError: nothing under that name"
        assert "an argument of echo() cannot be sent to the worker that owns the object" in report["echo_set"]
        assert "set" in report["echo_set"]
        assert "the result of leak() cannot be sent" in report["leak"]
        assert "object" in report["leak"]


@pytest.mark.gen_test(timeout=30)
async def test_rpc_within_one_worker_passes_values_as_they_are(tmp_path):
    caller, callee = owned_by(0, "caller"), owned_by(0, "callee")
    async with two_workers(tmp_path) as servers:
        _status, body, _ = await aget(servers[0].port, f"/rpc/{caller}/{callee}")
        report = json.loads(body)
        assert report["add"]["tuple"] == [1, 2]  # json.dumps made the tuple a list here
        assert "echo_set" not in report  # a set passes by reference in one worker
        assert "leak" not in report


@pytest.mark.gen_test(timeout=30)
async def test_a_router_that_does_not_route_by_the_request_is_refused(tmp_path, caplog):
    # Each worker's fetch sends every upgrade to the other worker's object: not a function
    # of the request, so the owner's second run would route it away again.
    def app_for(other: int) -> App:
        name = owned_by(other, "elsewhere")

        async def fetch(request, env):
            return await env.ROOM.get_by_name(name).fetch(request)

        return App(fetch=fetch, bindings={"ROOM": workers_app.Caller})

    async with two_workers(tmp_path, apps=(app_for(1), app_for(0))) as servers:
        with caplog.at_level(logging.ERROR), pytest.raises(InvalidStatus, match="HTTP 500"):
            await connect(f"ws://127.0.0.1:{servers[0].port}/room/x")
        assert any("fetch() must pick the object from the request alone" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_a_worker_that_is_not_there_gets_503_with_retry_after(tmp_path):
    name = owned_by(1, "room")
    async with two_workers(tmp_path, owner_wait=0.2, start=(0,)) as servers:
        status, body, headers = await aget(servers[0].port, f"/room/{name}")
        assert status == 503
        assert "worker 1, which owns this object, is not answering" in body
        assert headers["Retry-After"] == "1"
        with pytest.raises(InvalidStatus, match="HTTP 503"):
            await connect(f"ws://127.0.0.1:{servers[0].port}/room/{name}")


@pytest.mark.gen_test(timeout=30)
async def test_a_worker_never_constructs_an_object_it_does_not_own(tmp_path):
    async with two_workers(tmp_path) as servers:
        runtime = servers[0].runtime
        oid = ROOM.id_from_name(owned_by(1, "room"))
        with pytest.raises(InvalidStateError, match="is served by worker 1, not by this process"):
            runtime.host(oid, workers_app.Caller)


def test_merged_metrics_keep_each_family_together_with_a_worker_label():
    from wsecho.serve.metrics import merge_pages

    page = (
        b"# HELP a_total things\n# TYPE a_total counter\na_total 1.0\n"
        b'# HELP b things by kind\n# TYPE b gauge\nb{kind="x"} 2.0\nb{kind="y} z"} 3.0\n'
    )
    merged = merge_pages({0: page, 1: page}, b"# TYPE s gauge\ns 1\n").decode()
    assert merged == (
        "# TYPE s gauge\ns 1\n"
        "# HELP a_total things\n# TYPE a_total counter\n"
        'a_total{worker="0"} 1.0\na_total{worker="1"} 1.0\n'
        "# HELP b things by kind\n# TYPE b gauge\n"
        'b{kind="x",worker="0"} 2.0\nb{kind="y} z",worker="0"} 3.0\n'
        'b{kind="x",worker="1"} 2.0\nb{kind="y} z",worker="1"} 3.0\n'
    )


def test_placement_spreads_objects_and_is_fixed():
    placement = Placement(0, 3)
    owners = [placement.owner(ROOM.id_from_name(f"n{i}").hex) for i in range(3000)]
    assert {owners.count(k) for k in range(3)} <= set(range(900, 1100))
    assert owners == [Placement(2, 3).owner(ROOM.id_from_name(f"n{i}").hex) for i in range(3000)]
    with pytest.raises(ValueError, match="worker index 3 is not one of 3 workers"):
        Placement(3, 3)
