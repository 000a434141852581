"""A cluster behind a real HAProxy (Debian's, as a subprocess with the configuration
`wsecho haproxy-config` writes): requests reach an object's member, at worst after one 503
that teaches HAProxy the owner through its runtime API."""

import asyncio
import contextlib
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.apps import workers_app
from tests.pg import free_port
from wsecho.backends.leases import PostgresLeases
from wsecho.serve.config import Settings
from wsecho.serve.haproxy import Member, RouteKey, haproxy_config, runtime_api
from wsecho.serve.server import Server

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/install-proxies)"
)


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def until(check, timeout=15.0):
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def behind_haproxy(postgres_url, tmp_path, **settings):
    """Members ``a`` and ``b`` (in process) behind a real HAProxy that they teach; yields
    (servers, runtime API port, front port, owners map)."""
    api, front = free_port(), free_port()
    owners_map = tmp_path / "owners.map"
    owners_map.write_text("")
    servers = {}
    proc = None
    log = (tmp_path / "haproxy.log").open("w")
    try:
        for name in ("a", "b"):
            options = Settings(
                **{
                    "port": 0,
                    "admin_port": 0,
                    "data_dir": ":memory:",
                    "lease_ttl": 2.0,
                    "route_key": "path:2",
                    "haproxy_runtime": f"127.0.0.1:{api}",
                    "haproxy_map": str(owners_map),
                    **settings,
                }
            )
            servers[name] = Server(workers_app.app, options, leases=PostgresLeases(postgres_url, f"{name}-1", name))
            await servers[name].start()
        members = [Member(n, "127.0.0.1", s.port, s.admin_port) for n, s in servers.items()]
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                members,
                bind=f"127.0.0.1:{front}",
                route=RouteKey.parse("path:2"),
                runtime_api=f"ipv4@127.0.0.1:{api}",
                map_path=str(owners_map),
            )
        )
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

        async def both_up():
            if not all(s.cluster is not None and s.cluster.ready() for s in servers.values()):
                return False
            try:
                state = await runtime_api(f"127.0.0.1:{api}", "show servers state\n")
            except OSError:
                return False
            rows = [line.split() for line in state.splitlines()[2:] if line.strip()]
            return len(rows) == 6 and all(row[5] == "2" for row in rows)  # srv_op_state 2: running

        await until(both_up)
        yield servers, api, front, owners_map
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        for server in servers.values():
            await server.stop(timeout=1)


@pytest.mark.gen_test(timeout=90)
async def test_haproxy_learns_each_objects_member_after_at_most_one_refusal(postgres_url, tmp_path):
    async with behind_haproxy(postgres_url, tmp_path) as (_servers, api, front, owners_map):
        loop = asyncio.get_running_loop()
        refused = 0
        rooms = [f"room{i}" for i in range(12)]
        for room in rooms:
            try:
                ws = await connect(f"ws://127.0.0.1:{front}/room/{room}")
            except InvalidStatus as exc:
                status = exc.response.status_code
                refused += 1
                await until(lambda room=room: _mapped(api, owners_map, room))
                ws = await connect(f"ws://127.0.0.1:{front}/room/{room}")  # now straight to the owner
                assert status == 503
            await ws.send("inc")
            assert await ws.recv() == "ack 1"
            await ws.close()
        assert 0 < refused < len(rooms)  # some keys hashed to the other member and were taught
        # Learned: every room answers at once, sockets and plain requests alike.
        for room in rooms:
            ws = await connect(f"ws://127.0.0.1:{front}/room/{room}")
            await ws.send("inc")
            assert await ws.recv() == "ack 2"
            await ws.close()
            assert await loop.run_in_executor(None, get, front, f"/room/{room}") == 200


@pytest.mark.gen_test(timeout=90)
async def test_a_plain_request_passed_on_to_the_owner_teaches_haproxy_too(postgres_url, tmp_path):
    """With --cluster-secret a member passes a plain request for another member's object on
    (docs/decisions/0012) instead of refusing it; it teaches HAProxy that member all the same,
    so the next requests with that key go straight to the owner."""
    async with behind_haproxy(postgres_url, tmp_path, cluster_secret="a shared secret") as (
        servers,
        api,
        front,
        owners_map,
    ):
        loop = asyncio.get_running_loop()
        rooms = [f"room{i}" for i in range(12)]

        def passed_on() -> int:
            return sum(s.runtime.stats.snapshot().peer_calls["in", "ok"] for s in servers.values())

        for room in rooms:  # each answered at once, wherever HAProxy sends it
            assert await loop.run_in_executor(None, get, front, f"/room/{room}") == 200
        first = passed_on()
        assert first > 0  # some keys hashed to the member that does not own the object
        learned = [room for room in rooms if await _mapped(api, owners_map, room)]
        assert len(learned) == first  # each passed-on key was taught, and only those
        for room in rooms:
            assert await loop.run_in_executor(None, get, front, f"/room/{room}") == 200
        assert passed_on() == first  # taught: no request is passed on any more


async def _mapped(api: int, owners_map, room: str) -> bool:
    try:
        shown = await runtime_api(f"127.0.0.1:{api}", f"show map {owners_map}\n")
    except OSError:
        return False
    return f" {room} wsecho_" in shown


def test_the_config_command_prints_a_configuration_haproxy_accepts(tmp_path):
    owners_map = tmp_path / "owners.map"
    owners_map.write_text("")
    done = subprocess.run(
        [
            "wsecho" if shutil.which("wsecho") else "python",
            *([] if shutil.which("wsecho") else ["-m", "wsecho"]),
            "haproxy-config",
            "--member",
            "a=10.0.0.1:8787:9787",
            "--member",
            "b=10.0.0.2:8787:9787",
            "--route-key",
            "path:2",
            "--map",
            str(owners_map),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(done.stdout)
    check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "balance hash var(txn.route)" in done.stdout
    assert "hash-type consistent" in done.stdout


def test_a_bad_member_is_refused_with_status_2():
    done = subprocess.run(
        [
            *(["wsecho"] if shutil.which("wsecho") else ["python", "-m", "wsecho"]),
            "haproxy-config",
            "--member",
            "nonsense",
            "--route-key",
            "path:2",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "a member is NAME=HOST:PORT:ADMIN_PORT, got 'nonsense'" in done.stderr


def test_route_keys_read_the_request_as_haproxy_does():
    from wsecho.api.http import Request

    request = Request("http://x/room/ab%20c/more?r=q1&s=2", headers={"X-Room": "h1"})
    assert RouteKey.parse("path:2").value(request) == "ab%20c"
    assert RouteKey.parse("path:9").value(request) is None
    assert RouteKey.parse("query:r").value(request) == "q1"
    assert RouteKey.parse("header:X-Room").value(request) == "h1"
    assert RouteKey.parse("path:2").haproxy() == "path,field(3,/)"
    with pytest.raises(ValueError, match="must be path:N"):
        RouteKey.parse("cookie:x")
