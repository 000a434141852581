"""Three cluster members behind HAProxy against one member served directly (issue 16).

Both sides store in a PostgreSQL server of the benchmark's own (tests/pg.py) and serve
benchapps:rooms_app (``/room/NAME`` echoes to its sender). "direct": one ``python -m wsecho
--storage postgresql://...`` and the client on its port. "haproxy": three members with
``--member-name m1..m3 --route-key path:2 --haproxy-runtime`` behind Debian's HAProxy with the
configuration ``wsecho haproxy-config`` writes; every room is connected once first (retrying
the 503 that teaches HAProxy its owner), then the same load runs through HAProxy. Printed: the
messages per second of each, the ratio, and the CPU per message of each part (HAProxy, the
members together, the client). On a 2-core machine shared with the client, three members and
a proxy cannot beat one process: the figure is the proxy's cost and the cluster's overhead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchkit.config import Config
from benchkit.cpu import SpreadCpuMeter
from benchkit.errors import BenchError
from benchkit.load import describe, traffic
from benchkit.procs import HOST, PROCS, SCRIPTS, free_port, unpinned
from benchkit.report import Line, detail, fmt_rate, med
from benchkit.servers import Server, stop_server, tail

CONNECTIONS = 1000
ROOMS = 200
SIZE = 32
MEMBERS = 3
#: How long the members get to take their leases and HAProxy to see them up.
READY_TIMEOUT = 30.0


@dataclasses.dataclass
class Front(Server):
    """HAProxy in front of the members: the client's server, whose CPU is the sum of all."""

    members: list[Server] = dataclasses.field(default_factory=list)

    def url_of(self, index: int) -> str:
        return f"ws://{HOST}:{self.port}/room/r{index % ROOMS}"

    def cpu_meter(self) -> SpreadCpuMeter:
        parts = {"haproxy": self.pid} | {f"member {i + 1}": m.pid for i, m in enumerate(self.members)}
        return SpreadCpuMeter(parts)

    def check_alive(self) -> None:
        super().check_alive()
        for member in self.members:
            member.check_alive()


def member_argv(url: str, port: int, admin: int, name: str | None, runtime_api: int, owners: Path) -> list[str]:
    argv = [sys.executable, "-m", "wsecho", "benchapps:rooms_app", "--port", str(port), "--admin-port", str(admin)]
    argv += ["--storage", url, "--log-level", "warning", "--access-log", "off", "--drain-timeout", "1"]
    if name is not None:
        argv += ["--member-name", name, "--route-key", "path:2"]
        argv += ["--haproxy-runtime", f"{HOST}:{runtime_api}", "--haproxy-map", str(owners)]
    return argv


async def ready(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            if (await asyncio.to_thread(server.admin, "/readyz")).strip() == "ready":
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise BenchError(f"{server.kind} not ready within {READY_TIMEOUT}s:\n{tail(server.log)}")


async def start_member(cfg: Config, url: str, name: str | None, runtime_api: int, owners: Path) -> Server:
    port, admin = free_port(), free_port()
    log = cfg.tmp / f"cluster-{name or 'direct'}-{port}.log"
    proc = PROCS.start(
        member_argv(url, port, admin, name, runtime_api, owners), cwd=SCRIPTS, log=log, server=True, pin=False
    )
    return Server(f"member {name or 'direct'}", proc, port, admin, log, rooms=ROOMS, workers=1)


async def teach_every_room(front: Front) -> int:
    """Connect once to every room through HAProxy, retrying its first 503: HAProxy then knows
    every owner. Returns how many rooms were refused once."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    refused = 0
    for room in range(ROOMS):
        for attempt in range(50):
            try:
                ws = await connect(f"ws://{HOST}:{front.port}/room/r{room}", open_timeout=5)
            except InvalidStatus:
                refused += attempt == 0
                await asyncio.sleep(0.05)
                continue
            await ws.close()
            break
        else:
            raise BenchError(f"room r{room} was never served through HAProxy:\n{tail(front.log)}")
    return refused


async def bench_cluster(cfg: Config) -> list[Line]:
    from tests.pg import INSTALL_HINT, PostgresServer, find_binaries  # the repository root is on sys.path

    binaries, haproxy = find_binaries(), shutil.which("haproxy") or "/usr/sbin/haproxy"
    if binaries is None:
        raise BenchError(INSTALL_HINT)
    if not Path(haproxy).exists():
        raise BenchError("haproxy is not installed (scripts/install-proxies)")
    base = Path(tempfile.mkdtemp(prefix="wsecho-bench-cluster-"))
    postgres = PostgresServer(base, binaries)
    direct: list[float] = []
    behind: list[float] = []
    try:
        postgres.init().start()
        with unpinned():
            for r in range(cfg.rounds):
                rate, text = await one_direct(cfg, postgres.fresh_url())
                direct.append(rate)
                detail(f"[cluster_haproxy run {r + 1}] 1 member direct: {text}")
                rate, text = await one_behind(cfg, postgres.fresh_url(), haproxy, base)
                behind.append(rate)
                detail(f"[cluster_haproxy run {r + 1}] {MEMBERS} members behind HAProxy: {text}")
    finally:
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
    d, b = med(direct), med(behind)
    return [
        Line(
            "cluster_haproxy",
            f"{MEMBERS} members behind HAProxy {fmt_rate(b)} msg/s",
            f"1 member direct {fmt_rate(d)} msg/s",
            b / d,
            "recorded, no target (2 cores shared with the client)",
            True,
        )
    ]


def per_message(cpu_pct: float | None, rate: float) -> str:
    return "?" if cpu_pct is None or rate <= 0 else f"{cpu_pct / 100 / rate * 1e6:.1f} us"


async def one_direct(cfg: Config, url: str) -> tuple[float, str]:
    server = await start_member(cfg, url, None, 0, cfg.tmp / "unused.map")
    try:
        await ready(server, time.monotonic() + READY_TIMEOUT)
        t = await traffic(server, CONNECTIONS, SIZE, 1, cfg.warmup, cfg.duration)
    finally:
        stop_server(server)
    text = f"{describe(t)}; CPU per message: wsecho {per_message(t.cpu.server, t.msgs_per_s)}, "
    return t.msgs_per_s, text + f"client {per_message(t.cpu.client, t.msgs_per_s)}"


async def one_behind(cfg: Config, url: str, haproxy: str, base: Path) -> tuple[float, str]:
    from wsecho.serve.haproxy import Member, RouteKey, haproxy_config

    runtime_api, front_port = free_port(), free_port()
    owners = base / f"owners-{front_port}.map"
    owners.write_text("")
    members: list[Server] = []
    front: Front | None = None
    try:
        for i in range(MEMBERS):
            members.append(await start_member(cfg, url, f"m{i + 1}", runtime_api, owners))
        deadline = time.monotonic() + READY_TIMEOUT
        for member in members:
            await ready(member, deadline)
        config = base / f"haproxy-{front_port}.cfg"
        config.write_text(
            haproxy_config(
                [Member(f"m{i + 1}", HOST, m.port, m.admin_port or 0) for i, m in enumerate(members)],
                bind=f"{HOST}:{front_port}",
                route=RouteKey.parse("path:2"),
                runtime_api=f"ipv4@{HOST}:{runtime_api}",
                map_path=str(owners),
            )
        )
        log = cfg.tmp / f"haproxy-{front_port}.log"
        proc = PROCS.start([haproxy, "-db", "-f", str(config)], cwd=SCRIPTS, log=log, server=True, pin=False)
        front = Front("haproxy", proc, front_port, None, log, rooms=ROOMS, members=members)
        await asyncio.sleep(2.5)  # HAProxy's first health checks (every second, rise 1)
        refused = await teach_every_room(front)
        t = await traffic(front, CONNECTIONS, SIZE, 1, cfg.warmup, cfg.duration)
    finally:
        if front is not None:
            PROCS.stop(front.proc)
        for member in members:
            stop_server(member)
    parts = t.cpu.parts if hasattr(t.cpu, "parts") else {}
    haproxy_pct = parts.get("haproxy")
    member_pcts = [v for k, v in parts.items() if k.startswith("member") and v is not None]
    members_pct = sum(member_pcts) if member_pcts else None
    return t.msgs_per_s, (
        f"{describe(t)}; CPU per message: HAProxy {per_message(haproxy_pct, t.msgs_per_s)}, "
        f"members {per_message(members_pct, t.msgs_per_s)}, client {per_message(t.cpu.client, t.msgs_per_s)}; "
        f"{refused} of {ROOMS} rooms refused once while HAProxy learned their owners"
    )
