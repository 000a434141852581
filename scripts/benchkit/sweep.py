"""The hibernation sweep's cost with many hibernated objects, against few; timed in a child process."""

from __future__ import annotations

import json
import sys
from typing import Any

from benchkit.config import Config
from benchkit.errors import BenchError
from benchkit.interrupt import wait_until
from benchkit.procs import PROCS, SCRIPTS
from benchkit.report import Line, detail, med


async def sweep_child(cfg: Config, objects: int) -> dict[str, Any]:
    out = cfg.tmp / f"sweep-{objects}.json"
    argv = [sys.executable, "-m", "benchkit.sweepchild", str(objects), str(cfg.sweep_repeats)]
    proc = PROCS.start(argv, cwd=SCRIPTS, log=out, server=False)
    try:
        if not await wait_until(lambda: proc.poll() is not None, 300, step=0.05):
            raise BenchError(f"the sweep measurement with {objects} objects took over 300 s")
    finally:
        PROCS.stop(proc)
    text = out.read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"the sweep measurement with {objects} objects failed:\n{text[-2000:]}")
    return dict(json.loads(text.strip().splitlines()[-1]))


async def bench_sweep(cfg: Config) -> list[Line]:
    small: list[float] = []
    large: list[float] = []
    for r in range(cfg.rounds):
        for n, out in ((cfg.sweep_small, small), (cfg.sweep_objects, large)):
            res = await sweep_child(cfg, n)
            out.append(res["median_us"])
            detail(
                f"[sweep run {r + 1}] {n:,} hibernated objects + 10 due: median {res['median_us']:.1f} us, "
                f"p90 {res['p90_us']:.1f} us over {res['repeats']} sweeps (built in {res['build_s']:.1f} s)"
            )
    s, b = med(large), med(small)
    ratio = s / b
    return [
        Line(
            f"sweep_{cfg.sweep_objects}_hibernated_10_due",
            f"{s:.1f} us",
            f"with {cfg.sweep_small} objects {b:.1f} us",
            ratio,
            "<= 2x",
            ratio <= 2.0,
        )
    ]
