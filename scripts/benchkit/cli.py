"""wsecho against bare Tornado: throughput, wake cost, memory per idle socket, handshakes, fairness, fan-out.

Every figure is a ratio against a baseline measured in the same run, because absolute numbers
drift on shared machines. The servers run one at a time, alternating (baseline, wsecho,
baseline, wsecho, ...), each freshly started and pinned to CPU 0; the load generator is this
process, a picows client on uvloop pinned to CPU 1. The ``workers_*`` figures are the
exception: ``--workers 2`` against ``--workers 1``, nothing pinned (benchkit/workers.py).
Each figure is the median of 3 runs (1 with --quick). Every echo is checked byte for byte
(and text stays text, binary stays binary); any error ends the benchmark with exit status 1.

    scripts/bench                      # everything, a few minutes
    scripts/bench --quick              # shorter and smaller, a smoke check (< 1 minute)
    scripts/bench --only echo_100x32,wake_latency --duration 5

Servers: scripts/bench_baseline.py (a Tornado 6 WebSocketHandler echo on uvloop),
``python -m wsecho`` (the default application, or benchapps:wake_app for wake-per-message) and
scripts/bench_mounted.py (the default application in a Tornado app through wsecho.tornado.Mount);
``python -m wsecho benchapps:rooms_app --workers N`` (or busy_rooms_app) for the ``workers_*`` figures.
The fan-out figures add benchapps:fanout_app and fanout_loop_app and scripts/bench_fanout.py (a
Tornado room and a websockets room); their client is raw asyncio sockets (benchkit/fanout.py).
The hibernation sweep is timed in a child process on a Runtime with a fake clock. Storage turns
(``storage_turns``) compare ``--storage postgresql://`` with SQLite instead of a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

from benchkit.cluster import bench_cluster
from benchkit.config import Config
from benchkit.echo import bench_echo
from benchkit.errors import BenchError
from benchkit.fairness import bench_fairness
from benchkit.fanout import bench_fanout, bench_fanout_rss
from benchkit.handshakes import bench_handshakes
from benchkit.interrupt import INTERRUPT
from benchkit.memory import bench_memory, bench_memory_deflate
from benchkit.procs import CLIENT_CPU, PIN, PROCS, SERVER_CPU, raise_nofile_limit
from benchkit.report import Line
from benchkit.storage import bench_storage
from benchkit.sweep import bench_sweep
from benchkit.wake import bench_wake
from benchkit.workers import bench_workers_handover, bench_workers_scaling, bench_workers_scaling_work

#: Each measurement family, in the order a full run measures them.
GROUPS: dict[str, Callable[[Config], Awaitable[list[Line]]]] = {
    "echo_100x32": lambda cfg: bench_echo(cfg, "echo_100x32", 100, 32),
    "echo_100x4k": lambda cfg: bench_echo(cfg, "echo_100x4k", 100, 4096),
    "echo_1000x32": lambda cfg: bench_echo(cfg, "echo_1000x32", 1000, 32),
    # wss:// against Tornado with TLS (issue 14: at least 2x).
    "echo_tls_100x32": lambda cfg: bench_echo(cfg, "echo_tls_100x32", 100, 32, tls=True, target=2.0),
    "echo_deflate_4k_json": lambda cfg: bench_echo(
        cfg, "echo_deflate_4k_json", 100, 4096, compression=True, target=1.5
    ),
    # wsecho.tornado.Mount in a Tornado application: the same IOStream and framing as the
    # baseline, so the runtime's cost on that path (issue 14: at least 1.0x).
    "echo_mounted_100x32": lambda cfg: bench_echo(cfg, "echo_mounted_100x32", 100, 32, target=1.0, kind="mounted"),
    "wake": bench_wake,
    "rss_per_socket": bench_memory,
    "rss_per_socket_deflate": bench_memory_deflate,
    "handshakes": bench_handshakes,
    "fairness": bench_fairness,
    "sweep": bench_sweep,
    # One sender, a room of N sockets (issue 18): ctx.broadcast against a Tornado write_message
    # loop (target >= 6x), websockets' broadcast() (>= 2x) and wsecho's own get_web_sockets()
    # loop; latency from send to the last receipt; RSS when 10% of a room stop reading.
    "fanout_100": lambda cfg: bench_fanout(cfg, 100),
    "fanout_1000": lambda cfg: bench_fanout(cfg, 1000),
    "fanout_10000": lambda cfg: bench_fanout(cfg, 10_000),
    "fanout_rss": bench_fanout_rss,
    # PostgreSQL storage against SQLite (issue 16): put + reply turns per second.
    "storage_turns": bench_storage,
    # --workers 2 against --workers 1, 1,000 connections over 200 rooms (issue 15: at least 1.7x).
    "workers_scaling": bench_workers_scaling,
    # The same with handlers that do real work (0.3 ms of CPU per message): the client's
    # share of the two CPUs is then small, so what 2 workers add shows.
    "workers_scaling_work": bench_workers_scaling_work,
    "workers_handover": bench_workers_handover,
    # Three cluster members behind HAProxy against one member direct, on PostgreSQL (issue 16):
    # what the proxy and the cluster cost, with the CPU per message of each part.
    "cluster_haproxy": bench_cluster,
}

#: What --only accepts: each group's name, and the names of the lines it prints.
ALIASES = {
    "wake_per_message": "wake",
    "wake_latency": "wake",
    "wake_latency_p99": "wake",
    "memory": "rss_per_socket",
    "rss": "rss_per_socket",
    "fairness_least_over_most": "fairness",
    "fairness_p99_over_p50": "fairness",
    "evictor": "sweep",
    "fanout_rss_10pct_stalled": "fanout_rss",
}


def versions() -> str:
    import tornado

    import wsecho

    # Neither uvloop nor picows exports __version__ to a type checker; their metadata says the same.
    return (
        f"Python {platform.python_version()}, tornado {tornado.version}, uvloop {metadata.version('uvloop')}, "
        f"picows {metadata.version('picows')}, wsecho {wsecho.__version__}"
    )


async def main_async(args: argparse.Namespace, groups: list[str]) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if INTERRUPT.is_set:  # the second one: stop at once
            PROCS.stop_all()
            os._exit(130)
        INTERRUPT.set()
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job ignores Ctrl-C
        loop.add_signal_handler(signal.SIGINT, on_signal)
    quick = args.quick
    with tempfile.TemporaryDirectory(prefix="wsecho-bench-") as tmp:
        cfg = Config.make(quick=quick, duration=args.duration, tmp=Path(tmp))
        print(versions(), flush=True)
        pin = f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if PIN else "not pinned (fewer than 2 CPUs)"
        print(
            f"{'quick, ' if quick else ''}{cfg.rounds} run(s) per metric, {cfg.warmup:g} s warm-up + "
            f"{cfg.duration:g} s measured per load run, {pin}, RLIMIT_NOFILE {raise_nofile_limit()}",
            flush=True,
        )
        lines: list[Line] = []
        try:
            for group in groups:
                print(f"{group}:", flush=True)
                lines += await GROUPS[group](cfg)
        finally:
            PROCS.stop_all()
        print(flush=True)
        for line in lines:
            print(line.render(), flush=True)
        met = sum(line.met for line in lines)
        print(f"{met} of {len(lines)} targets met", flush=True)
        return 3 if args.strict and met < len(lines) else 0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run per metric, shorter and smaller (a smoke check)")
    p.add_argument(
        "--only",
        metavar="METRIC[,METRIC]",
        help=f"run only these: {', '.join(GROUPS)} (also {', '.join(ALIASES)})",
    )
    p.add_argument("--duration", type=float, metavar="S", help="measured seconds per load run (default 3, quick 1)")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when a target is not met")
    args = p.parse_args(argv)
    if args.duration is not None and not 0.1 <= args.duration <= 600:
        p.error("--duration must be between 0.1 and 600 seconds")
    groups = list(GROUPS)
    if args.only:
        groups = []
        for name in (n.strip() for n in args.only.split(",") if n.strip()):
            group = ALIASES.get(name, name)
            if group not in GROUPS:
                p.error(f"--only: unknown metric {name!r}; known: {', '.join([*GROUPS, *ALIASES])}")
            if group not in groups:
                groups.append(group)
        if not groups:
            p.error("--only: no metric named")
    return args, groups


def main(argv: list[str] | None = None) -> int:
    args, groups = parse_args(argv)
    raise_nofile_limit()
    if PIN:
        os.sched_setaffinity(0, {CLIENT_CPU})
    import uvloop

    try:
        return int(uvloop.run(main_async(args, groups)))
    except BenchError as exc:
        print(f"\nERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        PROCS.stop_all()
