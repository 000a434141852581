"""``--workers``: 2 workers against 1 on the same machine, echo throughput and connection set-up.

Both servers are ``python -m wsecho benchapps:rooms_app`` (``/room/NAME`` is the object NAME,
which echoes to the sender), one with ``--workers 1`` (one process, as without the flag) and one
with ``--workers 2`` (a supervisor and two workers), started alternately in the same run.
1,000 connections over 200 rooms, 5 a room; connection i is in room ``i % 200``.

Nothing is pinned here: the servers and the client (this process, still one process) may run
on every CPU, so on a 2-core machine the client takes its share from the two workers; the
CPU of the supervisor, each worker, the client and everything else on the machine is printed
for each run, so that who was saturated can be read off.

The accept queue is shared, so the worker that accepts a connection is not chosen by anyone:
about half of the connections reach the worker that does not own their room and are handed
to the owner (SCM_RIGHTS), once; the fraction moved comes from the supervisor's ``/metrics``.
``workers_scaling`` measures echo after the connections are open (a moved connection's frames
go straight to the owner, so it costs nothing there); ``workers_handover`` measures what the
hand-over costs: connections opened and first echo answered per second.

On 2 CPUs the echo figure cannot show what a second worker adds: the client spends about as
much CPU per echo as the server (system calls on loopback mostly), so it takes half of the
machine that the second worker would use. Hence two more things: the server CPU per message
of each, which gives what 2 workers do with a CPU each and the client elsewhere, and
``workers_scaling_work``, the same ping-pong with handlers that do 0.3 ms of work
(benchapps:busy_rooms_app), where the client's share is small.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

from benchkit.client import EchoConn, Run, close_conns, echo_once, open_conns
from benchkit.config import Config
from benchkit.load import describe, traffic
from benchkit.procs import unpinned
from benchkit.report import Line, detail, fmt_rate, med
from benchkit.servers import Server, start_server, stop_server

CONNECTIONS = 1000

ROOMS = 200

SIZE = 32

#: Handshakes in flight while connecting, as in the ``handshakes`` figure.
CONCURRENCY = 50

#: (--workers 2) / (--workers 1), issue 15's target for echo on 2 cores.
SCALING_TARGET = 1.7

#: Opening connections when about half of them move must still beat one worker.
HANDOVER_TARGET = 1.0

WORKER_COUNTS = (1, 2)


@dataclasses.dataclass
class Sample:
    """One run of one server."""

    rate: float  # messages or connections per second
    moved: float  # the fraction of the connections handed to another worker
    server_us: float  # server CPU per message or connection (nan: unknown)
    text: str  # what it printed


def us_per(cpu_pct: float | None, rate: float) -> float:
    """Microseconds of CPU per event, from % of one CPU and events per second (nan: unknown)."""
    return float("nan") if cpu_pct is None or rate <= 0 else cpu_pct / 100 / rate * 1e6


async def start_rooms(cfg: Config, workers: int, kind: str = "rooms") -> Server:
    return await start_server(kind, cfg.tmp, workers=workers, rooms=ROOMS)


def moved_text(moved: int, opened: int) -> tuple[float, str]:
    """The fraction of ``opened`` connections handed to another worker, and how to print it."""
    fraction = moved / opened if opened else 0.0
    return fraction, f"{moved} of {opened} connections moved ({100 * fraction:.0f}%)"


async def alternate(
    cfg: Config,
    name: str,
    per: tuple[str, str],
    target: float,
    measure: Callable[[Config, int], Awaitable[Sample]],
) -> list[Line]:
    """``--workers 1``, ``--workers 2``, ... ``cfg.rounds`` times; the line of the median rates
    (``per``: what is counted, as in "per message" and in "msg/s")."""
    samples: dict[int, list[Sample]] = {n: [] for n in WORKER_COUNTS}
    with unpinned():
        for r in range(cfg.rounds):
            for workers in WORKER_COUNTS:
                sample = await measure(cfg, workers)
                samples[workers].append(sample)
                detail(f"[{name} run {r + 1}] --workers {workers}: {sample.text}")
    one, two = (med(s.rate for s in samples[n]) for n in WORKER_COUNTS)
    # What the CPU accounting says 2 workers would do with 2 CPUs of their own (the client
    # elsewhere) against 1 worker with 1: 2 / (server us per event, 2 workers) over 1 / (the same, 1 worker).
    us1, us2 = (med(s.server_us for s in samples[n]) for n in WORKER_COUNTS)
    detail(
        f"{name}: server CPU per {per[0]}: --workers 1 {us1:.1f} us, --workers 2 "
        f"{us2:.1f} us; with a CPU for each worker and the client elsewhere: {2 * us1 / us2:.2f}x"
    )
    ratio, unit = two / one, per[1]
    moved = med(s.moved for s in samples[2])
    return [
        Line(
            name,
            f"{fmt_rate(two)} {unit} ({100 * moved:.0f}% moved)",
            f"--workers 1 {fmt_rate(one)} {unit}",
            ratio,
            f">= {target}x",
            ratio >= target,
        )
    ]


async def ping_pong_once(cfg: Config, workers: int, kind: str = "rooms") -> Sample:
    """Echo ping-pong on every connection for warm-up + duration, the last part measured."""
    server = await start_rooms(cfg, workers, kind)
    try:
        t = await traffic(server, CONNECTIONS, SIZE, 1, cfg.warmup, cfg.duration)
        fraction, text = moved_text(server.moved_out(), CONNECTIONS)
    finally:
        stop_server(server)
    server_us = us_per(t.cpu.server, t.msgs_per_s)
    client_us = us_per(t.cpu.client, t.msgs_per_s)
    text = f"{describe(t)}; CPU per message: server {server_us:.1f} us, client {client_us:.1f} us; {text}"
    return Sample(t.msgs_per_s, fraction, server_us, text)


async def set_up_once(cfg: Config, workers: int) -> Sample:
    """Connections opened and answered their first echo per second."""
    server = await start_rooms(cfg, workers)
    run = Run(SIZE)
    conns: list[EchoConn] = []
    try:
        # Warm-up in a room of its own: /websocket is the room named "websocket".
        warm = await open_conns(run, server.url, 20, concurrency=20, first_idx=10**6)
        await close_conns(warm)
        run.check(f"--workers {workers}: warm-up")
        before = server.moved_out()
        t0, meter = time.perf_counter(), server.cpu_meter()
        conns = await open_conns(run, server.url_of, CONNECTIONS, CONCURRENCY)
        run.check(f"--workers {workers}: {CONNECTIONS} handshakes")
        await echo_once(run, conns)
        run.check(f"--workers {workers}: the first echo on each connection")
        elapsed, cpu = time.perf_counter() - t0, meter.stop()
        fraction, text = moved_text(server.moved_out() - before, len(conns))
    finally:
        await close_conns(conns)
        stop_server(server)
    run.check(f"--workers {workers}: closing")
    rate = len(conns) / elapsed
    server_us = us_per(cpu.server, rate)
    text = (
        f"{fmt_rate(rate)} connections/s opened and first echo answered ({CONNECTIONS}, {CONCURRENCY} "
        f"in flight), server CPU {server_us:.0f} us per connection, {cpu}; {text}"
    )
    return Sample(rate, fraction, server_us, text)


async def bench_workers_scaling(cfg: Config) -> list[Line]:
    return await alternate(cfg, "workers_scaling", ("message", "msg/s"), SCALING_TARGET, ping_pong_once)


async def bench_workers_scaling_work(cfg: Config) -> list[Line]:
    async def measure(cfg: Config, workers: int) -> Sample:
        return await ping_pong_once(cfg, workers, "busy_rooms")

    return await alternate(cfg, "workers_scaling_work", ("message", "msg/s"), SCALING_TARGET, measure)


async def bench_workers_handover(cfg: Config) -> list[Line]:
    return await alternate(cfg, "workers_handover", ("connection", "connections/s"), HANDOVER_TARGET, set_up_once)
