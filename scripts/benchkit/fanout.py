"""Fan-out: one sender, a room of N sockets, every message to every member (issue 18).

The servers: wsecho's ``ctx.broadcast`` (``benchapps:fanout_app``), wsecho's application-level
loop over ``ctx.get_web_sockets()`` (``benchapps:fanout_loop_app``), a bare Tornado loop of
``write_message`` and the ``websockets`` library's ``broadcast()`` (scripts/bench_fanout.py).

The client must read N times what the server writes, so it is cheap per delivery: each member
is a raw asyncio protocol on uvloop (the handshake by hand, then no frame parsing at all).
Every message is a text frame of the same size, so a member has received ``k`` messages once
``k * frame`` bytes arrived; a message is delivered when the last member has it. That also
checks "exactly once" (every member ends with exactly ``messages * frame`` bytes) and order
(a frame boundary never moves).

- deliveries/s: messages of 64 B, at most ``WINDOW`` not yet delivered to everyone, over the
  run (member count x messages / time from the first send to the last receipt);
- latency: one message at a time, from its send to the last member's receipt, p50 and p99;
- RSS with 10% of the members not reading: messages of 16 KiB until each reader has 16 MiB
  more, then the server's RSS over what it was before.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
import time

from benchkit.config import Config
from benchkit.cpu import CpuMeter
from benchkit.errors import BenchError
from benchkit.interrupt import check_interrupted
from benchkit.load import percentile
from benchkit.procs import HOST, proc_rss_kib, raise_nofile_limit
from benchkit.report import Line, detail, fmt_rate, med
from benchkit.servers import Server, start_server, stop_server

perf_ns = time.perf_counter_ns

#: Client source addresses, rotated so that 10,000 sockets never run out of ephemeral ports.
SOURCES = [f"127.0.0.{2 + i}" for i in range(16)]
#: Messages of a throughput run that may be on their way at once.
WINDOW = 16
CONNECT_CONCURRENCY = 200
#: Bounds on every wait.
CONNECT_TIMEOUT = 120.0
PHASE_TIMEOUT = 120.0

#: The servers, in the order each round starts them.
KINDS = ("fanout_tornado", "fanout_websockets", "fanout_loop", "fanout_broadcast")
LABELS = {
    "fanout_tornado": "tornado write_message loop",
    "fanout_websockets": "websockets broadcast()",
    "fanout_loop": "wsecho get_web_sockets() loop",
    "fanout_broadcast": "wsecho ctx.broadcast",
}


def masked_text_frame(payload: bytes) -> bytes:
    """A client's text frame (masked, RFC 6455 §5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frame_size(payload: int) -> int:
    return payload + (2 if payload < 126 else 4 if payload < 65536 else 10)


class Room:
    """The members of one run and what they received: ``reached[k]`` members have message k."""

    def __init__(self, payload: int) -> None:
        self.frame = server_frame_size(payload)
        self.message = masked_text_frame(b"m" * payload)
        self.members: list[Member] = []
        self.readers = 0
        self.reached: list[int] = []
        self.sent_at: list[int] = []
        self.done_at: list[int] = []
        self.delivered = 0  # messages every reader has
        self.sent = 0
        self.target = 0  # messages this phase sends
        self.window = 1
        self.changed = asyncio.Event()
        self.errors: list[str] = []

    def error(self, text: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(text)
        self.changed.set()

    def send(self) -> None:
        self.sent_at.append(perf_ns())
        self.reached.append(0)
        self.sent += 1
        self.members[0].transport.write(self.message)

    def advance(self, before: int, after: int) -> None:
        reached, readers = self.reached, self.readers
        if after > len(reached):
            self.error(f"a member got {after} messages; {len(reached)} were sent")
            return
        now = 0
        for k in range(before, after):
            reached[k] += 1
            if reached[k] == readers:
                now = now or perf_ns()
                self.done_at.append(now)
                self.delivered += 1
                if self.sent < self.target and self.sent - self.delivered < self.window:
                    self.send()
        if now:
            self.changed.set()

    async def phase(self, messages: int, window: int) -> tuple[float, list[int]]:
        """Send ``messages`` more, at most ``window`` undelivered; (seconds, latencies in ns)."""
        start = self.sent
        self.target, self.window = start + messages, window
        for _ in range(min(window, messages)):
            self.send()
        deadline = time.monotonic() + PHASE_TIMEOUT
        while self.delivered < self.target and not self.errors:
            check_interrupted()
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.delivered - start} of {messages} messages reached every member in time")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                continue
        if self.errors:
            raise BenchError("; ".join(self.errors))
        elapsed = (self.done_at[self.target - 1] - self.sent_at[start]) / 1e9
        latencies = [self.done_at[k] - self.sent_at[k] for k in range(start, self.target)]
        return elapsed, latencies


class Member(asyncio.Protocol):
    """One socket of the room: a hand-made handshake, then a byte count."""

    def __init__(self, room: Room, path: str, reading: bool) -> None:
        self.room = room
        self.path = path
        self.reading = reading
        self.transport: asyncio.Transport
        self.head = b""
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0  # bytes of frames
        self.count = 0  # whole messages
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(BenchError(f"handshake refused: {self.head[:80]!r}"))
                return
            data, self.head = self.head[end + 4 :], b""
            self.opened.set_result(None)
            if not self.reading:
                self.transport.pause_reading()
            if not data:
                return
        self.received += len(data)
        count = self.received // self.room.frame
        if count > self.count:
            before, self.count = self.count, count
            if self.reading:
                self.room.advance(before, count)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(BenchError(f"connection lost during the handshake: {exc}"))
        elif self.reading:
            self.room.error(f"a reading member lost its connection: {exc}")


async def join(room: Room, server: Server, count: int, stalled: int = 0) -> None:
    """Open ``count`` members (the last ``stalled`` of them never read), bounded in time."""
    loop = asyncio.get_running_loop()
    indexes = iter(range(count))

    async def worker() -> None:
        for i in indexes:
            member = Member(room, "/websocket", reading=i < count - stalled)

            def protocol(m: Member = member) -> Member:
                return m

            await loop.create_connection(protocol, HOST, server.port, local_addr=(SOURCES[i % 16], 0))
            await member.opened
            room.members.append(member)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(CONNECT_CONCURRENCY, count))]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), CONNECT_TIMEOUT)
    except TimeoutError:
        raise BenchError(f"{server.kind}: {len(room.members)} of {count} members joined in time") from None
    room.members.sort(key=lambda m: not m.reading)  # members[0], the sender, reads
    room.readers = count - stalled


def leave(room: Room) -> None:
    for member in room.members:
        if not member.closed:
            member.transport.abort()


@dataclasses.dataclass
class FanoutRun:
    deliveries_per_s: float
    p50_us: float
    p99_us: float


async def fanout_run(cfg: Config, kind: str, members: int, messages: int, latency_messages: int) -> FanoutRun:
    server = await start_server(kind, cfg.tmp)
    room = Room(64)
    try:
        await join(room, server, members)
        await room.phase(WINDOW, WINDOW)  # warm-up: code paths, buffers
        meter = CpuMeter(server.pid)
        elapsed, _ = await room.phase(messages, WINDOW)
        cpu = meter.stop()
        _, latencies = await room.phase(latency_messages, 1)
        server.check_alive()
        expected = room.sent * room.frame
        wrong = [m.received for m in room.members if m.received != expected]
        if wrong:
            raise BenchError(f"{kind}: {len(wrong)} members got {wrong[0]} bytes, not {expected}")
    finally:
        leave(room)
        stop_server(server)
    latencies.sort()
    run = FanoutRun(members * messages / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99))
    detail(
        f"{LABELS[kind]}: {fmt_rate(run.deliveries_per_s)} deliveries/s ({cpu}), "
        f"latency p50 {run.p50_us / 1000:.2f} ms, p99 {run.p99_us / 1000:.2f} ms"
    )
    return run


async def bench_fanout(cfg: Config, members: int) -> list[Line]:
    """``ctx.broadcast`` to ``members`` sockets against the three others (medians of ``cfg.rounds``)."""
    limit = raise_nofile_limit()
    if members + 200 > limit:
        raise BenchError(f"RLIMIT_NOFILE is {limit}: too low for {members} client sockets (ulimit -n)")
    # About 300,000 deliveries per run (a quarter with --quick): the slowest server takes seconds.
    deliveries = 75_000 if cfg.rounds == 1 else 300_000
    messages = max(20, deliveries // members)
    latency_messages = 100 if members <= 1000 else 30
    runs: dict[str, list[FanoutRun]] = {kind: [] for kind in KINDS}
    for r in range(cfg.rounds):
        detail(f"[fanout_{members} run {r + 1}] {members} members, {messages} messages of 64 B, one sender")
        for kind in KINDS:
            runs[kind].append(await fanout_run(cfg, kind, members, messages, latency_messages))
    rate = {kind: med(run.deliveries_per_s for run in runs[kind]) for kind in KINDS}
    ours = rate["fanout_broadcast"]
    name = f"fanout_{members}"
    lines = []
    for kind, target in (("fanout_tornado", 6.0), ("fanout_websockets", 2.0), ("fanout_loop", 1.0)):
        ratio = ours / rate[kind]
        lines.append(
            Line(
                f"{name}_vs_{kind.removeprefix('fanout_')}",
                f"{fmt_rate(ours)} deliveries/s",
                f"{LABELS[kind]} {fmt_rate(rate[kind])}",
                ratio,
                f">= {target}x",
                ratio >= target,
            )
        )
    for q in ("p50", "p99"):
        mine = med(getattr(run, f"{q}_us") for run in runs["fanout_broadcast"])
        base = med(getattr(run, f"{q}_us") for run in runs["fanout_tornado"])
        ratio = mine / base
        lines.append(
            Line(
                f"{name}_latency_{q}",
                f"{mine / 1000:.2f} ms send to last receipt",
                f"{LABELS['fanout_tornado']} {base / 1000:.2f} ms",
                ratio,
                "<= 1.0x",
                ratio <= 1.0,
            )
        )
    return lines


async def stalled_rss(cfg: Config, kind: str, members: int) -> float:
    """MiB the server's RSS grew while 10% of ``members`` stopped reading and the rest got 16 MiB."""
    wsecho = kind in ("fanout_loop", "fanout_broadcast")
    server = await start_server(kind, cfg.tmp, admin=wsecho)
    payload = 16 * 1024
    room = Room(payload)
    stalled = members // 10
    try:
        await join(room, server, members, stalled)
        await room.phase(4, 4)
        rss0 = proc_rss_kib(server.pid)
        await room.phase(1024, WINDOW)  # 16 MiB to each member
        server.check_alive()
        grown = (proc_rss_kib(server.pid) - rss0) / 1024
        # (A stalled client does not notice its cut: it reads nothing. The server counts them.)
        cut = re.search(r"^wsecho_fanout_closed_total (\S+)$", server.admin("/metrics"), re.M) if wsecho else None
    finally:
        leave(room)
        stop_server(server)
    closed = f"; {float(cut.group(1)):.0f} of the {stalled} stalled members cut (1008)" if cut else ""
    detail(f"{LABELS[kind]}: RSS +{grown:.1f} MiB{closed}")
    return grown


async def bench_fanout_rss(cfg: Config) -> list[Line]:
    """RSS growth with 10% of a room of 100 not reading, ``ctx.broadcast`` over the Tornado loop."""
    members = 100
    runs: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(cfg.rounds):
        detail(f"[fanout_rss run {r + 1}] {members} members, {members // 10} not reading, 16 MiB of 16 KiB messages")
        for kind in KINDS:
            runs[kind].append(await stalled_rss(cfg, kind, members))
    ours, base = med(runs["fanout_broadcast"]), med(runs["fanout_tornado"])
    ratio = ours / base if base > 0 else 0.0
    others = ", ".join(f"{LABELS[k]} +{med(runs[k]):.1f} MiB" for k in ("fanout_websockets", "fanout_loop"))
    return [
        Line(
            "fanout_rss_10pct_stalled",
            f"+{ours:.1f} MiB",
            f"{LABELS['fanout_tornado']} +{base:.1f} MiB; {others}",
            ratio,
            "<= 0.25x",
            ratio <= 0.25,
        )
    ]
