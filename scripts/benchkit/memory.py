"""Server memory per idle socket: RSS with N idle (hibernated) sockets minus before, over N."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from benchkit.client import EchoConn, Run, close_conns, echo_once, open_conns
from benchkit.config import Config
from benchkit.errors import BenchError
from benchkit.procs import proc_rss_kib, raise_nofile_limit
from benchkit.report import Line, detail, med
from benchkit.servers import Server, start_server, stop_server


async def wait_hibernated(server: Server, sockets: int, timeout: float) -> None:
    """Poll the admin /objects until the object "foo" hibernates holding ``sockets`` sockets."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        seen = json.loads(server.admin("/objects"))
        foo = [o for o in seen.get("objects", []) if o.get("name") == "foo"]
        if foo and foo[0]["state"] == "hibernating" and foo[0]["sockets"] == sockets:
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"the object did not hibernate with {sockets} sockets within {timeout:g}s: {seen}")


async def memory_round(cfg: Config, kind: str, hibernate_after: float, compression: bool = False) -> dict[int, float]:
    """Bytes of server RSS per idle socket at each of ``cfg.memory_sizes`` open sockets (with
    ``compression``, sockets that negotiated permessage-deflate and echoed a compressed 4 KiB)."""
    server = await start_server(
        kind,
        cfg.tmp,
        hibernate_after=hibernate_after if kind != "baseline" else None,
        admin=kind != "baseline",
        compression=compression,
    )
    run = Run(4096 if compression else 32, deflate=compression)
    conns: list[EchoConn] = []
    per_socket: dict[int, float] = {}
    try:
        # Warm-up: the first connections load code and create the object; then they go.
        warm = await open_conns(run, server.url, 20, concurrency=20, first_idx=10**6)
        await echo_once(run, warm)
        await close_conns(warm)
        run.check(f"{kind}: warm-up")
        await asyncio.sleep(hibernate_after + 1)
        rss0 = proc_rss_kib(server.pid)
        for n in cfg.memory_sizes:
            more = await open_conns(run, server.url, n - len(conns), concurrency=100, first_idx=len(conns))
            conns += more
            run.check(f"{kind}: opening {n} sockets")
            await echo_once(run, more)
            run.check(f"{kind}: one echo on each of {n} sockets")
            if kind == "baseline":
                await asyncio.sleep(hibernate_after + 1)
            else:
                await wait_hibernated(server, n, timeout=hibernate_after + 30)
            server.check_alive()
            rss = proc_rss_kib(server.pid)
            per_socket[n] = (rss - rss0) * 1024 / n
            detail(
                f"{kind}: RSS {rss0 / 1024:.1f} MiB before, {rss / 1024:.1f} MiB with {n} idle sockets: "
                f"{per_socket[n]:,.0f} bytes per socket"
            )
    finally:
        await close_conns(conns)
        stop_server(server)
    run.check(f"{kind}: idle sockets")
    return per_socket


async def bench_memory(cfg: Config) -> list[Line]:
    limit = raise_nofile_limit()
    if max(cfg.memory_sizes) + 200 > limit:
        raise BenchError(f"RLIMIT_NOFILE is {limit}: too low to hold {max(cfg.memory_sizes)} client sockets")
    hibernate_after = 0.5
    base: dict[int, list[float]] = {n: [] for n in cfg.memory_sizes}
    ws: dict[int, list[float]] = {n: [] for n in cfg.memory_sizes}
    for r in range(cfg.rounds):
        for kind, out in (("baseline", base), ("wsecho", ws)):
            detail(f"[rss_per_socket run {r + 1}] {kind}")
            for n, v in (await memory_round(cfg, kind, hibernate_after)).items():
                out[n].append(v)
    lines = []
    for n in cfg.memory_sizes:
        b, w = med(base[n]), med(ws[n])
        ratio = w / b
        lines.append(
            Line(
                f"rss_per_socket@{n}",
                f"{w:,.0f} B/socket",
                f"baseline {b:,.0f} B/socket",
                ratio,
                "<= 0.4x",
                ratio <= 0.4,
            )
        )
    return lines


async def bench_memory_deflate(cfg: Config) -> list[Line]:
    """RSS per idle hibernated socket with permessage-deflate over the same without (target <= 2x)."""
    limit = raise_nofile_limit()
    if max(cfg.memory_sizes) + 200 > limit:
        raise BenchError(f"RLIMIT_NOFILE is {limit}: too low to hold {max(cfg.memory_sizes)} client sockets")
    hibernate_after = 0.5
    plain: dict[int, list[float]] = {n: [] for n in cfg.memory_sizes}
    packed: dict[int, list[float]] = {n: [] for n in cfg.memory_sizes}
    for r in range(cfg.rounds):
        for compression, out in ((False, plain), (True, packed)):
            detail(f"[rss_per_socket_deflate run {r + 1}] wsecho, compression {'on' if compression else 'off'}")
            for n, v in (await memory_round(cfg, "wsecho", hibernate_after, compression)).items():
                out[n].append(v)
    lines = []
    for n in cfg.memory_sizes:
        p, c = med(plain[n]), med(packed[n])
        ratio = c / p
        lines.append(
            Line(
                f"rss_per_socket_deflate@{n}",
                f"{c:,.0f} B/socket",
                f"plain {p:,.0f} B/socket",
                ratio,
                "<= 2.0x",
                ratio <= 2.0,
            )
        )
    return lines
