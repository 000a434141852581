"""One load run: connections keep a window of messages in flight; throughput and latency of the measured part."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from array import array

from benchkit.client import Run, close_conns, drain, open_conns
from benchkit.cpu import CpuUse, SpreadCpuUse
from benchkit.errors import BenchError
from benchkit.report import fmt_rate
from benchkit.servers import Server


def percentile(sorted_ns: list[int] | array[int], q: float) -> float:
    """Nearest-rank percentile in microseconds."""
    n = len(sorted_ns)
    if not n:
        return float("nan")
    return sorted_ns[min(n - 1, max(0, int(q * n + 0.999999) - 1))] / 1000


@dataclasses.dataclass
class Traffic:
    msgs_per_s: float
    messages: int  # inside the measured window
    total: int  # all echoes, warm-up included
    p50_us: float
    p99_us: float
    min_per_conn: int
    max_per_conn: int
    cpu: CpuUse | SpreadCpuUse


async def traffic(server: Server, connections: int, size: int, window: int, warmup: float, duration: float) -> Traffic:
    """``connections`` x ``window`` messages in flight for warmup + duration seconds; measure the last part."""
    run = Run(size, deflate=server.compression)
    conns = await open_conns(run, server.url_of, connections, concurrency=100, ssl_context=server.tls)
    run.check(f"{server.kind}: connecting")
    loop = asyncio.get_running_loop()
    try:
        run.sending = True
        for c in conns:
            for _ in range(window):
                c.send_next()
        await asyncio.sleep(warmup)
        server.check_alive()
        run.recording = True
        t0, meter = time.perf_counter(), server.cpu_meter()
        stop: asyncio.Future[None] = loop.create_future()

        def finish() -> None:
            if not stop.done():
                stop.set_result(None)

        handle = loop.call_later(duration, finish)
        try:
            await asyncio.wait_for(stop, duration + 5)
        finally:
            handle.cancel()
        run.recording = False
        elapsed = time.perf_counter() - t0
        cpu = meter.stop()
        await drain(run, conns, f"{server.kind} traffic")
        run.check(f"{server.kind}: traffic")
        if run.count == 0:
            raise BenchError(f"{server.kind}: no echo inside the measured window")
    finally:
        await close_conns(conns)
    run.check(f"{server.kind}: closing")
    server.check_alive()
    lat = sorted(run.lat)
    per_conn = sorted(c.received for c in conns)
    return Traffic(
        msgs_per_s=run.count / elapsed,
        messages=run.count,
        total=run.total,
        p50_us=percentile(lat, 0.5),
        p99_us=percentile(lat, 0.99),
        min_per_conn=per_conn[0],
        max_per_conn=per_conn[-1],
        cpu=cpu,
    )


def describe(t: Traffic) -> str:
    return f"{fmt_rate(t.msgs_per_s)} msg/s, p50 {t.p50_us / 1000:.2f} ms, p99 {t.p99_us / 1000:.2f} ms, {t.cpu}"
