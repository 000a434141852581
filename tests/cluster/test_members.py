"""Cluster members in one process, real PostgreSQL leases, real clients: objects move with
their slots, a member that cannot prove a lease stops serving (1012, 503), another takes over."""

import asyncio
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.apps import workers_app
from tests.integration.test_workers_mesh import ROOM
from wsecho.backends.leases import PostgresLeases
from wsecho.core.leases import desired_slots
from wsecho.core.placement import slot_of
from wsecho.serve.config import Settings
from wsecho.serve.server import Server

TTL = 1.0


def name_moving_to(member: str, members: set[str], prefix: str = "room") -> str:
    share = desired_slots(member, members)
    for i in range(1000):
        if slot_of(ROOM.id_from_name(f"{prefix}{i}").hex) in share:
            return f"{prefix}{i}"
    raise AssertionError


async def start(dsn: str, member: str) -> Server:
    server = Server(
        workers_app.app,
        Settings(port=0, data_dir=":memory:", lease_ttl=TTL, admin_port=0),
        leases=PostgresLeases(dsn, member),
    )
    await server.start()
    return server


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    return await asyncio.get_running_loop().run_in_executor(None, get, port, path)


async def until(predicate, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=60)
async def test_slots_move_to_a_new_member_and_a_member_that_cannot_renew_stops_serving(postgres_url):
    a = await start(postgres_url, "A")
    b = None
    try:
        assert a.cluster is not None
        await until(a.cluster.ready)
        moving = name_moving_to("B", {"A", "B"})
        staying = name_moving_to("A", {"A", "B"}, prefix="stay")
        ws_moving = await connect(f"ws://127.0.0.1:{a.port}/room/{moving}")
        ws_staying = await connect(f"ws://127.0.0.1:{a.port}/room/{staying}")
        for ws in (ws_moving, ws_staying):
            await ws.send("inc")
            assert await ws.recv() == "ack 1"

        b = await start(postgres_url, "B")  # B joins: half the slots move to it
        assert b.cluster is not None
        await until(lambda: b.cluster.ready() and a.cluster.ready())
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws_moving.recv(), 10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1012  # reconnect: the object moved
        await ws_staying.send("pid")  # the other object was not disturbed
        assert (await ws_staying.recv()).startswith("pid ")
        status, body = await aget(a.port, f"/room/{moving}")
        assert status == 503
        assert "another member of the cluster" in body
        status, _ = await aget(b.port, f"/room/{moving}")
        assert status == 200
        assert (await aget(a.port, "/room/x"))[0] in (200, 503)

        # B is cut off from the lease table (its renewals stop): it must stop serving its
        # objects within the ttl, and A takes them over once B's leases expire.
        ws_b = await connect(f"ws://127.0.0.1:{b.port}/room/{moving}")
        b.cluster._task.cancel()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws_b.recv(), 10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1012
        with pytest.raises(InvalidStatus, match="HTTP 503"):
            await connect(f"ws://127.0.0.1:{b.port}/room/{moving}")
        await until(lambda: a.cluster.table.provable(slot_of(ROOM.id_from_name(moving).hex), a.cluster.clock()))
        status, _ = await aget(a.port, f"/room/{moving}")
        assert status == 200
        assert a.cluster.table.epoch(slot_of(ROOM.id_from_name(moving).hex)) == 3  # A, then B, then A again
        await ws_staying.close()
    finally:
        for server in (a, b):
            if server is not None:
                await server.stop(timeout=1)


@pytest.mark.gen_test(timeout=60)
async def test_a_member_no_load_balancer_checks_gives_its_objects_away_until_checks_return(postgres_url):
    settings = Settings(port=0, data_dir=":memory:", lease_ttl=TTL, lb_probe_timeout=1.5)
    a = Server(workers_app.app, settings, leases=PostgresLeases(postgres_url, "A"))
    b = Server(workers_app.app, settings, leases=PostgresLeases(postgres_url, "B"))
    await a.start()
    await b.start()
    probing = {"A": True, "B": True}

    async def probe():  # the load balancer's health checks
        while True:
            for name, server in (("A", a), ("B", b)):
                if probing[name]:
                    await server.readiness()
            await asyncio.sleep(0.2)

    checks = asyncio.ensure_future(probe())
    try:
        assert a.cluster is not None
        assert b.cluster is not None
        await until(lambda: a.cluster.ready() and b.cluster.ready() and len(a.cluster.members) == 2)
        name = name_moving_to("A", {"A", "B"})
        ws = await connect(f"ws://127.0.0.1:{a.port}/room/{name}")
        probing["A"] = False  # A is cut off from the load balancer
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1012
        slot = slot_of(ROOM.id_from_name(name).hex)
        await until(lambda: b.cluster.table.provable(slot, b.cluster.clock()))  # B serves A's objects
        assert (await aget(b.port, f"/room/{name}"))[0] == 200
        probing["A"] = True  # reachable again: A takes its share back
        await until(lambda: a.cluster.table.provable(slot, a.cluster.clock()))
        assert (await aget(a.port, f"/room/{name}"))[0] == 200
    finally:
        checks.cancel()
        for server in (a, b):
            await server.stop(timeout=1)
