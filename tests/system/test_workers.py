"""``wsecho --workers N`` with real processes: one live instance per object across workers,
SIGKILL of a worker losing nothing acknowledged, SIGTERM draining every worker, the seed
application exact, the admin listener speaking for all workers."""

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve as wsserve
from websockets.exceptions import ConnectionClosed

from tests.helpers import ServerProcess
from tests.integration.test_workers_mesh import owned_by
from wsecho.serve.config import Settings, parse, usable_cpus

ROOT = Path(__file__).resolve().parents[2]
ADMIN = re.compile(r"admin listener on http://127\.0\.0\.1:(\d+) ")
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


class Workers(ServerProcess):
    """A supervisor and its workers; stop() ends the supervisor and every worker it started, by PID."""

    def __init__(self, args, **kwargs):
        super().__init__(["--workers", "2", "--port", "0", "--admin-port", "0", *args], cwd=ROOT, **kwargs)
        self.pids: dict[int, list[int]] = {}
        self.admin = 0

    def wait_for(self, pattern, timeout=15.0):
        return super().wait_for(pattern, timeout)

    def ready(self):
        self.port = int(self.wait_for(r"on http://127\.0\.0\.1:(\d+) with 2 workers").group(1))
        self.admin = int(self.wait_for(ADMIN).group(1))
        return self

    def worker_pids(self) -> dict[int, list[int]]:
        pids: dict[int, list[int]] = {}
        for line in self.seen:
            if m := STARTED.search(line):
                pids.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        return pids

    def admin_get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=10) as response:
            return response.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        while not self.lines.empty():  # the start lines no wait_for has read yet
            self.seen.append(self.lines.get_nowait())
        for pids in self.worker_pids().values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.close_output()


def run(coro_fn):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), 60))
    finally:
        loop.close()


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def workers(tmp_path):
    started = []

    def start(*args, env=None):
        server = Workers([*args, "--data-dir", str(tmp_path / "data")], env=env)
        started.append(server)
        return server.ready()

    yield start
    for server in started:
        server.stop()


def test_the_seed_application_counts_50_clients_whichever_worker_accepted_them(workers):
    server = workers()

    async def scenario():
        clients = [await connect(f"ws://127.0.0.1:{server.port}/websocket") for _ in range(50)]
        for ws in clients[:5]:
            await ws.send("hello")
            assert await ws.recv() == "[Durable Object]: hello"
        text = await asyncio.get_running_loop().run_in_executor(None, get, server.port, "/getCurrentConnections")
        for ws in clients:
            await ws.close()
        return text

    assert run(scenario) == "There are 50 WebSocket clients connected to this Durable Object instance."
    objects = json.loads(server.admin_get("/objects"))
    assert [(o["name"], o["worker"]) for o in objects["objects"]] == [("foo", objects["objects"][0]["worker"])]
    assert objects["count"] == 1
    metrics = server.admin_get("/metrics")
    assert 'wsecho_workers{state="ready"} 2' in metrics
    moved_out = [float(v) for v in re.findall(r'connections_moved_total\{direction="out",worker="\d"\} (\S+)', metrics)]
    moved_in = [float(v) for v in re.findall(r'connections_moved_total\{direction="in",worker="\d"\} (\S+)', metrics)]
    assert sum(moved_out) == sum(moved_in)  # every connection that landed elsewhere moved to foo's worker
    assert server.admin_get("/readyz").strip() == "ready"


def test_concurrent_first_requests_for_one_name_build_one_instance(workers, tmp_path):
    probe = tmp_path / "probe.log"
    server = workers("tests.apps.workers_app", "--hibernate-after", "600", env={"WSECHO_TEST_PROBE_LOG": str(probe)})

    async def scenario():
        loop = asyncio.get_running_loop()

        async def socket_client():
            ws = await connect(f"ws://127.0.0.1:{server.port}/room/solo")
            await ws.send("inc")
            reply = await ws.recv()
            await ws.close()
            return reply

        plain = [loop.run_in_executor(None, get, server.port, "/room/solo") for _ in range(10)]
        replies = await asyncio.gather(*(socket_client() for _ in range(30)), *plain)
        return replies

    replies = run(scenario)
    assert sorted(int(r.split()[1]) for r in replies[:30]) == list(range(1, 31))  # one counter, no lost update
    lines = [line.split() for line in probe.read_text().splitlines()]
    constructors = [line for line in lines if line[0] == "ctor" and line[1] == "solo"]
    assert len(constructors) == 1, constructors
    pid = constructors[0][2]
    turns = sorted((float(x[3]), float(x[4]), x[2]) for x in lines if x[0] == "turn")
    assert len(turns) == 70  # 30 upgrades, 30 messages, 10 plain requests
    assert {p for _, _, p in turns} == {pid}
    for (_, end, _), (start, _, _) in itertools.pairwise(turns):
        assert start >= end, "two turns of one object overlapped"


def test_a_worker_killed_with_sigkill_loses_no_acknowledged_write_and_comes_back(workers, tmp_path):
    probe = tmp_path / "probe.log"
    server = workers("tests.apps.workers_app", env={"WSECHO_TEST_PROBE_LOG": str(probe)})
    doomed, spared = owned_by(0, "doomed"), owned_by(1, "spared")
    acked: dict[str, int] = {doomed: 0, spared: 0}

    async def pump(name, stop_after_close):
        ws = await connect(f"ws://127.0.0.1:{server.port}/room/{name}")
        try:
            while True:
                await ws.send("inc")
                reply = await ws.recv()
                acked[name] = int(reply.split()[1])
                if stop_after_close.is_set() and name == spared:
                    return "alive"
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else 1006
        finally:
            await ws.close()

    async def scenario():
        killed = asyncio.Event()
        tasks = [asyncio.ensure_future(pump(n, killed)) for n in (doomed, spared)]
        while acked[doomed] < 50 or acked[spared] < 50:
            await asyncio.sleep(0.01)
        os.kill(server.worker_pids()[0][0], signal.SIGKILL)
        killed.set()
        return await asyncio.gather(*tasks)

    outcome = run(scenario)
    assert outcome == [1006, "alive"]  # the killed worker's client was cut, the other's kept going
    server.wait_for(r"worker 0 \(pid \d+\) was killed by SIGKILL")
    server.wait_for(r"worker 0 ready")
    name, _, count, _ = get(server.port, f"/room/{doomed}").split()
    assert name == doomed
    assert int(count) >= acked[doomed]  # nothing acknowledged was lost
    old, new = server.worker_pids()[0]
    lines = [line.split() for line in probe.read_text().splitlines()]
    pids = [int(line[2]) for line in lines if line[0] == "ctor" and line[1] == doomed]
    assert pids == [old, new]  # rebuilt once, in the restarted worker
    rebuilt = next(float(x[3]) for x in lines if x[0] == "ctor" and x[1] == doomed and int(x[2]) == new)
    last_old_turn = max(float(x[4]) for x in lines if x[0] == "turn" and x[1] == doomed and int(x[2]) == old)
    assert rebuilt > last_old_turn  # never two live instances: the new one began after the old one's last turn
    assert "wsecho_worker_restarts_total 1" in server.admin_get("/metrics")


def test_sigterm_closes_every_workers_clients_with_1001_and_exits_0(workers):
    server = workers("tests.apps.workers_app")
    names = [owned_by(0, "a"), owned_by(1, "b")]

    async def scenario():
        clients = [await connect(f"ws://127.0.0.1:{server.port}/room/{n}") for n in names for _ in range(3)]
        for ws in clients:
            await ws.send("pid")
        pids = {(await ws.recv()).split()[1] for ws in clients}
        assert len(pids) == 2  # both workers hold clients
        server.proc.send_signal(signal.SIGTERM)
        codes = []
        for ws in clients:
            await asyncio.wait_for(ws.wait_closed(), 15)
            codes.append(ws.close_code)
        return codes

    assert run(scenario) == [1001] * 6
    assert server.proc.wait(timeout=30) == 0
    for pid in server.worker_pids()[0] + server.worker_pids()[1]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be auto or a whole number from 1 to 256, got '0'"),
        (
            ["--workers", "2", "--certfile", "c.pem", "--keyfile", "k.pem"],
            "--workers: 2 with --certfile: a TLS connection cannot move to the worker that owns its object",
        ),
    ],
)
def test_bad_workers_settings_are_refused_with_status_2(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "wsecho", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_with_postgresql_the_supervisor_migrates_once_before_the_workers_and_hides_the_password(
    workers, postgres_url, tmp_path
):
    secret = postgres_url.replace("wsecho@", "wsecho:s3cret@")  # trust: the password is not checked
    server = workers("tests.apps.workers_app", "--storage", secret)
    migrating = [i for i, line in enumerate(server.seen) if "to schema version" in line]
    first_worker = next(i for i, line in enumerate(server.seen) if STARTED.search(line))
    assert len(migrating) == 1
    assert migrating[0] < first_worker  # by the supervisor, before any worker opened the database
    assert not any("s3cret" in line for line in server.seen)
    assert any(f"data in {postgres_url})" in line for line in server.seen)
    name = owned_by(1, "pg")
    assert get(server.port, f"/room/{name}").split()[0] == name  # a worker serves from PostgreSQL
    assert not (tmp_path / "data").exists()  # no SQLite, no data directory lock


def test_auto_is_the_usable_cpus():
    settings, _ = parse(["--workers", "auto"], {})
    assert settings.workers == usable_cpus() >= 1
    assert Settings().workers == 1


def test_the_supervisor_alone_tells_systemd_ready_after_every_worker_and_stopping(workers, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    try:
        server = workers(env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        messages = []
        while "READY=1" not in messages or not any(m.startswith("STATUS=") for m in messages):
            data, _ = notify.recvfrom(4096)
            messages.extend(data.decode().split("\n"))
        ready_lines = [line for line in server.seen if re.search(r"worker \d ready", line)]
        assert len(ready_lines) == 2  # both workers were ready before the supervisor said so
        server.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            data, _ = notify.recvfrom(4096)
            messages.extend(data.decode().split("\n"))
        assert server.proc.wait(timeout=30) == 0
        statuses = [m for m in messages if m.startswith("STATUS=")]
        assert statuses
        assert statuses[0].startswith("STATUS=ready: 2 workers of 2 ready; 0 WebSockets;")
        # Only the supervisor notified: one READY, however many workers.
        assert messages.count("READY=1") == 1
    finally:
        notify.close()


def test_an_outbound_websocket_lives_in_its_objects_worker_and_wakes_it_there(workers):
    """ctx.connect_web_socket with --workers 2 (decision 0011): whichever worker accepted the
    client, the object's own worker opens and holds the upstream connection, and what the
    upstream sends wakes the hibernated object in that worker."""
    server = workers("tests.apps.outbound_workers:app")
    pids = {index: found[-1] for index, found in server.worker_pids().items()}
    rooms = {owned_by(0, "feed"): pids[0], owned_by(1, "feed"): pids[1]}

    async def scenario():
        peers = {}
        heard: asyncio.Queue[str] = asyncio.Queue()

        async def upstream(peer):
            peers[peer.request.path.strip("/")] = peer
            async for message in peer:
                await heard.put(message)
                await peer.send(f"echo:{message}")

        def built(reply: str, text: str, pid: int) -> int:
            m = re.fullmatch(rf"{re.escape(text)} pid={pid} built=(\d+)", reply)
            assert m is not None, reply
            return int(m.group(1))

        async with wsserve(upstream, "127.0.0.1", 0) as up:
            port = up.sockets[0].getsockname()[1]
            clients = {}
            for room, pid in rooms.items():
                ws = clients[room] = await connect(f"ws://127.0.0.1:{server.port}/room/{room}")
                await ws.send(f"connect ws://127.0.0.1:{port}/{room}")
                assert await ws.recv() == f"connected {pid}"  # opened by the object's own worker
            for room, pid in rooms.items():
                ws = clients[room]
                await ws.send(f"hello {room}")
                assert await heard.get() == f"hello {room}"
                first = built(await ws.recv(), f"echo:hello {room}", pid)
                # The object hibernated after that turn; the upstream's own message wakes it
                # again, in the same worker, with its upstream socket.
                await peers[room].send("news")
                assert built(await ws.recv(), "news", pid) > first
            for ws in clients.values():
                await ws.close()

    run(scenario)


def test_max_storage_holds_the_workers_together_to_the_quota(workers, tmp_path):
    """--max-storage counts what every worker stores (decision 0005, docs/operations.md
    "Quotas"): two objects in two workers, each writing until refused, store together no more
    than the documented bound past the quota, not a quota each."""
    from tests.apps.quota_workers import VALUE
    from wsecho.api import codec
    from wsecho.backends.base import SQLiteBackend, entry_bytes
    from wsecho.runtime.commits import RECOUNT_SHARE

    quota = 64_000
    entry = entry_bytes("k000", codec.encode(VALUE))
    bound = quota + (2 - 1) * (quota // RECOUNT_SHARE + entry)  # one share and one commit group
    server = workers("tests.apps.quota_workers:app", "--max-storage", str(quota), "--max-object-storage", "off")
    rooms = [owned_by(0, "store"), owned_by(1, "store")]

    async def scenario():
        clients = [await connect(f"ws://127.0.0.1:{server.port}/room/{room}") for room in rooms]
        refused: dict[int, str] = {}
        for i in range(1000):
            for n, ws in enumerate(clients):
                if n not in refused:
                    await ws.send(f"put k{i:03}")
                    answer = await ws.recv()
                    if answer != "ok":
                        refused[n] = answer
            if len(refused) == len(clients):
                break
        for ws in clients:
            await ws.close()
        return refused

    refused = run(scenario)
    assert len(refused) == 2, refused
    for answer in refused.values():
        assert "the quota is 64,000 (--max-storage)" in answer
    metrics = server.admin_get("/metrics")
    assert re.search(r'wsecho_storage_quota_refusals_total\{quota="total",worker="0"\} [1-9]', metrics), metrics
    assert re.search(r'wsecho_storage_quota_refusals_total\{quota="total",worker="1"\} [1-9]', metrics), metrics
    server.stop()

    async def total():
        backend = SQLiteBackend(tmp_path / "data", lock=False)
        await backend.open()
        try:
            return await backend.usage(None)
        finally:
            await backend.close()

    stored = run(total)
    assert quota - 2 * entry < stored <= bound  # one quota for both, not one each
