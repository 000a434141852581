"""In a child process: time ``Runtime.sweep`` with many hibernated objects and exactly 10 due.

    python -m benchkit.sweepchild OBJECTS REPEATS    (cwd: scripts/)

prints one JSON line: the median and p90 of REPEATS sweeps, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import uvloop

from benchkit.errors import BenchError
from wsecho import Request
from wsecho.examples import echo
from wsecho.runtime import Runtime


def utc_now() -> datetime:
    return datetime.now(UTC)


def sweep_measure(objects: int, repeats: int) -> dict[str, Any]:
    """In this (child) process: time ``Runtime.sweep`` with ``objects`` hibernated and exactly 10 due."""

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    async def measure() -> dict[str, Any]:
        clock = Clock()
        runtime = Runtime(echo.app, clock=clock, wall_clock=utc_now, hibernate_after=10.0)
        ns = runtime.env.WEBSOCKET_HIBERNATION_SERVER
        t0 = time.perf_counter()
        # Each object accepts one socket, so that it stays known while it hibernates (an
        # object with no socket is forgotten). The 10 "due" objects become idle 5 s later.
        stubs = [ns.get_by_name(f"object-{i}") for i in range(objects)]
        due, rest = stubs[:10], stubs[10:]
        for group, at in ((rest, 1000.0), (due, 1005.0)):
            clock.now = at
            for stub in group:
                resp = await stub.fetch(Request("http://bench/websocket", headers={"Upgrade": "websocket"}))
                if resp.status != 101:
                    raise BenchError(f"the echo object answered {resp.status} to an upgrade")
        hibernated = runtime.sweep(now=1010.0)
        if hibernated != objects - 10:
            raise BenchError(f"expected {objects - 10} objects to hibernate, {hibernated} did")
        build_s = time.perf_counter() - t0
        times = []
        now = 1010.0
        for _ in range(repeats):
            now += 20.0
            clock.now = now
            for stub in due:  # wake them: the constructor runs, then the fetch
                await stub.fetch("http://bench/getCurrentConnections")
            t = time.perf_counter_ns()
            n = runtime.sweep(now=now + 10.0)
            times.append(time.perf_counter_ns() - t)
            if n != 10:
                raise BenchError(f"a sweep hibernated {n} objects, expected exactly 10")
        if len(runtime.hosts()) != objects:
            raise BenchError(f"{len(runtime.hosts())} objects known, expected {objects}")
        times.sort()
        return {
            "objects": objects,
            "repeats": repeats,
            "median_us": statistics.median(times) / 1000,
            "p90_us": times[int(0.9 * (len(times) - 1))] / 1000,
            "build_s": build_s,
        }

    return dict(uvloop.run(measure()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("objects", type=int)
    parser.add_argument("repeats", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(sweep_measure(args.objects, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
