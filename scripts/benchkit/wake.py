"""Waking per message: the throughput of an object that hibernates after every message, and wake latency.

The wake latency comes from the server's own histogram on the admin ``/metrics``.
"""

from __future__ import annotations

import re

from benchkit.config import Config
from benchkit.errors import BenchError
from benchkit.load import describe, traffic
from benchkit.report import Line, detail, fmt_rate, med
from benchkit.servers import start_server, stop_server

PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        m = PROM_LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def wake_buckets(metrics: dict[str, float]) -> list[tuple[float, float]]:
    """Cumulative (upper bound in seconds, count) of wsecho_wake_latency_seconds, +Inf last."""
    out = []
    for key, value in metrics.items():
        m = re.fullmatch(r'wsecho_wake_latency_seconds_bucket\{le="([^"]+)"\}', key)
        if m:
            out.append((float(m.group(1)), value))
    return sorted(out)


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of the observations between two scrapes."""
    counts = dict(before)
    delta = [(le, n - counts.get(le, 0.0)) for le, n in after]
    if not delta or delta[-1][1] <= 0:
        return float("nan")
    need = q * delta[-1][1]
    for le, n in delta:
        if n >= need:
            return le
    return float("inf")


async def bench_wake(cfg: Config) -> list[Line]:
    active, woken, p99s = [], [], []
    for r in range(cfg.rounds):
        server = await start_server("wsecho", cfg.tmp)
        try:
            t = await traffic(server, 100, 32, 1, cfg.warmup, cfg.duration)
        finally:
            stop_server(server)
        active.append(t.msgs_per_s)
        detail(f"[wake run {r + 1}] wsecho, object active: {describe(t)}")
        server = await start_server("wake", cfg.tmp, admin=True)
        try:
            before = parse_prometheus(server.admin("/metrics"))
            t = await traffic(server, 100, 32, 1, cfg.warmup, cfg.duration)
            after = parse_prometheus(server.admin("/metrics"))
        finally:
            stop_server(server)
        wakes = after.get("wsecho_wakes_total", 0) - before.get("wsecho_wakes_total", 0)
        received = after.get("wsecho_messages_received_total", 0) - before.get("wsecho_messages_received_total", 0)
        if received < t.total or wakes < 0.9 * received:
            raise BenchError(
                f"wake-per-message did not wake per message: {wakes:.0f} wakes for {received:.0f} messages "
                f"received by the server ({t.total} echoes seen by the client)"
            )
        p99 = bucket_quantile(wake_buckets(before), wake_buckets(after), 0.99)
        p50 = bucket_quantile(wake_buckets(before), wake_buckets(after), 0.50)
        woken.append(t.msgs_per_s)
        p99s.append(p99)
        detail(
            f"[wake run {r + 1}] wsecho, wake per message: {describe(t)}; {wakes:.0f} wakes for "
            f"{received:.0f} messages; wake latency p50 <= {p50 * 1e3:g} ms, p99 <= {p99 * 1e3:g} ms"
        )
    a, w = med(active), med(woken)
    p99 = med(p99s)
    return [
        Line(
            "wake_per_message",
            f"{fmt_rate(w)} msg/s",
            f"object active {fmt_rate(a)} msg/s",
            w / a,
            ">= 0.5x",
            w / a >= 0.5,
        ),
        Line(
            "wake_latency_p99",
            f"<= {p99 * 1e3:g} ms (histogram bucket)",
            "no baseline",
            None,
            "<= 1 ms",
            p99 <= 0.001,
        ),
    ]
