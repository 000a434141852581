"""Handshakes per second: opening many connections, a bounded number in flight."""

from __future__ import annotations

import time

from benchkit.client import EchoConn, Run, close_conns, echo_once, open_conns
from benchkit.config import Config
from benchkit.cpu import CpuMeter, CpuUse
from benchkit.report import Line, detail, fmt_rate, med
from benchkit.servers import start_server, stop_server


async def handshakes_once(cfg: Config, kind: str) -> tuple[float, CpuUse]:
    server = await start_server(kind, cfg.tmp)
    run = Run(32)
    conns: list[EchoConn] = []
    try:
        warm = await open_conns(run, server.url, 20, concurrency=20, first_idx=10**6)
        await close_conns(warm)
        run.check(f"{kind}: warm-up")
        t0, meter = time.perf_counter(), CpuMeter(server.pid)
        conns = await open_conns(run, server.url, cfg.handshakes, cfg.handshake_concurrency)
        elapsed, cpu = time.perf_counter() - t0, meter.stop()
        run.check(f"{kind}: {cfg.handshakes} handshakes")
        await echo_once(run, conns[:: max(1, len(conns) // 50)])  # the sockets work
        run.check(f"{kind}: echo after the handshakes")
    finally:
        await close_conns(conns)
        stop_server(server)
    run.check(f"{kind}: closing")
    return len(conns) / elapsed, cpu


async def bench_handshakes(cfg: Config) -> list[Line]:
    base: list[float] = []
    ws: list[float] = []
    for r in range(cfg.rounds):
        for kind, out in (("baseline", base), ("wsecho", ws)):
            rate, cpu = await handshakes_once(cfg, kind)
            out.append(rate)
            detail(
                f"[handshakes run {r + 1}] {kind}: {fmt_rate(rate)} handshakes/s "
                f"({cfg.handshakes}, {cfg.handshake_concurrency} in flight), {cpu}"
            )
    b, w = med(base), med(ws)
    ratio = w / b
    return [
        Line("handshakes", f"{fmt_rate(w)}/s", f"baseline {fmt_rate(b)}/s", ratio, ">= 1.2x", ratio >= 1.2),
    ]
