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


async def compare_memory(
    cfg: Config, name: str, sides: tuple[tuple[str, str, bool], tuple[str, str, bool]], target: float
) -> list[Line]:
    """RSS per idle hibernated socket of ``sides[1]`` over ``sides[0]`` (each ``(label, server
    kind, compression)``), at each of ``cfg.memory_sizes``, medians of ``cfg.rounds``."""
    limit = raise_nofile_limit()
    if max(cfg.memory_sizes) + 200 > limit:
        raise BenchError(f"RLIMIT_NOFILE is {limit}: too low to hold {max(cfg.memory_sizes)} client sockets")
    hibernate_after = 0.5
    results: list[dict[int, list[float]]] = [{n: [] for n in cfg.memory_sizes} for _ in sides]
    for r in range(cfg.rounds):
        for (label, kind, compression), out in zip(sides, results, strict=True):
            detail(f"[{name} run {r + 1}] {label}")
            for n, v in (await memory_round(cfg, kind, hibernate_after, compression)).items():
                out[n].append(v)
    lines = []
    for n in cfg.memory_sizes:
        b, w = med(results[0][n]), med(results[1][n])
        ratio = w / b
        lines.append(
            Line(
                f"{name}@{n}",
                f"{w:,.0f} B/socket",
                f"{sides[0][0]} {b:,.0f} B/socket",
                ratio,
                f"<= {target}x",
                ratio <= target,
            )
        )
    return lines


async def bench_memory(cfg: Config) -> list[Line]:
    """RSS per idle hibernated socket against bare Tornado's per idle socket (target <= 0.4x)."""
    return await compare_memory(
        cfg, "rss_per_socket", (("baseline", "baseline", False), ("wsecho", "wsecho", False)), 0.4
    )


async def bench_memory_deflate(cfg: Config) -> list[Line]:
    """RSS per idle hibernated socket with permessage-deflate over the same without (target <= 2x)."""
    sides = (("plain", "wsecho", False), ("wsecho, compression on", "wsecho", True))
    return await compare_memory(cfg, "rss_per_socket_deflate", sides, 2.0)
