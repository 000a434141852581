"""Echo throughput: wsecho's messages per second over the baseline's, at a given connection count and size."""

from __future__ import annotations

from benchkit.config import Config
from benchkit.load import Traffic, describe, traffic
from benchkit.report import Line, detail, fmt_rate, med
from benchkit.servers import start_server, stop_server


async def one_load_run(
    cfg: Config,
    kind: str,
    connections: int,
    size: int,
    *,
    tls: bool = False,
    compression: bool = False,
    flags: tuple[str, ...] = (),
) -> Traffic:
    """Start a ``kind`` server, put one message per connection in flight for warm-up + duration, stop it."""
    server = await start_server(kind, cfg.tmp, tls=tls, compression=compression, flags=flags)
    try:
        return await traffic(server, connections, size, 1, cfg.warmup, cfg.duration)
    finally:
        stop_server(server)


async def bench_echo(
    cfg: Config,
    name: str,
    connections: int,
    size: int,
    *,
    tls: bool = False,
    compression: bool = False,
    target: float = 4.0,
    kind: str = "wsecho",
) -> list[Line]:
    """With ``tls``, both servers serve wss:// with a certificate from a CA the client trusts;
    with ``compression`` both serve permessage-deflate (Tornado with its defaults). ``kind`` is
    the server measured against the baseline: ``wsecho`` or ``mounted`` (in a Tornado app)."""
    base: list[float] = []
    ws: list[float] = []
    for r in range(cfg.rounds):
        for server_kind, out in (("baseline", base), (kind, ws)):
            t = await one_load_run(cfg, server_kind, connections, size, tls=tls, compression=compression)
            out.append(t.msgs_per_s)
            detail(f"[{name} run {r + 1}] {server_kind}: {describe(t)}")
    b, w = med(base), med(ws)
    ratio = w / b
    return [
        Line(name, f"{fmt_rate(w)} msg/s", f"baseline {fmt_rate(b)} msg/s", ratio, f">= {target}x", ratio >= target)
    ]
