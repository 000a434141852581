"""Fairness under load: the least served connection against the most served, and p99 over p50 latency."""

from __future__ import annotations

from benchkit.config import Config
from benchkit.load import describe, traffic
from benchkit.report import Line, detail, med
from benchkit.servers import start_server, stop_server


async def bench_fairness(cfg: Config) -> list[Line]:
    spread: dict[str, list[float]] = {"baseline": [], "wsecho": []}
    tail_ratio: dict[str, list[float]] = {"baseline": [], "wsecho": []}
    for r in range(cfg.rounds):
        for kind in ("baseline", "wsecho"):
            server = await start_server(kind, cfg.tmp)
            try:
                t = await traffic(server, 100, 32, 8, cfg.warmup, cfg.duration)
            finally:
                stop_server(server)
            spread[kind].append(t.min_per_conn / t.max_per_conn if t.max_per_conn else 0.0)
            tail_ratio[kind].append(t.p99_us / t.p50_us)
            detail(f"[fairness run {r + 1}] {kind}: {describe(t)}; per connection {t.min_per_conn}..{t.max_per_conn}")
    s, sb = med(spread["wsecho"]), med(spread["baseline"])
    q, qb = med(tail_ratio["wsecho"]), med(tail_ratio["baseline"])
    return [
        Line("fairness_least_over_most", f"{s:.2f}", f"baseline {sb:.2f}", None, ">= 0.5", s >= 0.5),
        Line("fairness_p99_over_p50", f"{q:.1f}", f"baseline {qb:.1f}", None, "<= 20", q <= 20),
    ]
