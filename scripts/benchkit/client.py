"""The load client: picows connections that send numbered messages and check every echo byte for byte.

With ``deflate`` the connections offer permessage-deflate as browsers do, compress every
message on their own (RSV1) and inflate what comes back compressed; the payload is then JSON.

Messages alternate text and binary (text must come back as text, binary as binary); every
wrong echo, unexpected close or failed connect is counted in the :class:`Run` and ends the
measurement with :class:`~benchkit.errors.BenchError`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import time
import zlib
from array import array
from collections.abc import Callable, Iterable

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from benchkit.errors import BenchError
from benchkit.interrupt import wait_until

perf_ns = time.perf_counter_ns

PREFIX = b"[Durable Object]: "

#: Client source addresses, rotated so that many sockets never run out of ephemeral ports.
SOURCE_ADDRESSES = [f"127.0.0.{2 + i}" for i in range(16)]

DRAIN_TIMEOUT = 15.0

CLOSE_TIMEOUT = 15.0

TEXT = WSMsgType.TEXT

BINARY = WSMsgType.BINARY

CLOSE = WSMsgType.CLOSE

#: What browsers offer (RFC 7692), and what a receiver appends before inflating a message.
OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
TAIL = b"\x00\x00\xff\xff"


def json_filler(size: int) -> bytes:
    """``size`` bytes of JSON-like text: records with repeated keys and varying values."""
    records = json.dumps([{"id": i, "user": f"user-{i * 7919 % 10007}", "score": i * 0.37} for i in range(size)])
    return records.encode()[:size]


def deflated(data: bytes) -> bytes:
    """A message compressed on its own (no context takeover), cheaply: the client is not measured."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -13, 5)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


class Run:
    """The state one load run shares between its connections."""

    def __init__(self, size: int, *, deflate: bool = False) -> None:
        alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        self.filler = bytes(alphabet[i % len(alphabet)] for i in range(max(0, size - 16)))
        self.deflate = deflate
        if deflate:
            self.filler = json_filler(max(0, size - 16))
        self.sending = False
        self.recording = False
        self.count = 0
        self.total = 0
        self.lat = array("q")
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: list[str] = []

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{kind}: {detail}" if detail else kind)

    def check(self, what: str) -> None:
        if self.errors:
            counts = ", ".join(f"{k} x{n}" for k, n in self.errors.most_common())
            raise BenchError(f"{what}: {counts}\n  " + "\n  ".join(self.samples))


class EchoConn(WSListener):
    """One connection: sends numbered messages (even: text, odd: binary) and checks each echo."""

    def __init__(self, run: Run, idx: int) -> None:
        super().__init__()
        self.run = run
        self.idx = idx
        self.transport: WSTransport  # set by on_ws_connected, before any frame
        self.inflight: collections.deque[tuple[int, WSMsgType, bytes]] = collections.deque()
        self.seq = 0
        self.received = 0  # echoes inside the measured window
        self.closing = False
        self.closed = False
        #: One inflater for the connection: it also reads messages compressed on their own.
        self.inflater = zlib.decompressobj(-15) if run.deflate else None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send_next(self) -> None:
        seq = self.seq
        self.seq = seq + 1
        msg = b"%08x%08x" % (self.idx, seq) + self.run.filler
        mt = BINARY if (seq + self.idx) & 1 else TEXT
        self.inflight.append((perf_ns(), mt, PREFIX + msg))
        if self.inflater is not None:
            self.transport.send(mt, deflated(msg), rsv1=True)
        else:
            self.transport.send(mt, msg)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        mt = frame.msg_type
        if mt in (TEXT, BINARY):
            now = perf_ns()
            run = self.run
            data = frame.get_payload_as_bytes()
            if frame.rsv1 and self.inflater is not None:
                data = self.inflater.decompress(data + TAIL)
            if not self.inflight:
                run.error("unexpected_message", repr(data[:60]))
                return
            t0, expected_type, expected = self.inflight.popleft()
            if data != expected or mt != expected_type or not frame.fin:
                run.error(
                    "wrong_echo",
                    f"conn {self.idx}: got {mt.name} {data[:60]!r} (fin={frame.fin}), "
                    f"expected {expected_type.name} {expected[:60]!r}",
                )
            run.total += 1
            if run.recording:
                run.count += 1
                self.received += 1
                run.lat.append(now - t0)
            if run.sending:
                self.send_next()
        elif mt == CLOSE:
            if not self.closing:
                self.run.error("server_closed", f"conn {self.idx}: close {frame.get_close_code()}")
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if not self.closing:
            self.run.error("disconnected", f"conn {self.idx} lost")


async def open_conns(
    run: Run,
    url: str | Callable[[int], str],
    count: int,
    concurrency: int,
    first_idx: int = 0,
    timeout: float = 180.0,
    ssl_context: ssl.SSLContext | None = None,
) -> list[EchoConn]:
    """Open ``count`` connections, at most ``concurrency`` handshakes in flight, within ``timeout``
    (``url``: every connection's, or connection i's ``url(i)``)."""
    url_of = (lambda _: url) if isinstance(url, str) else url
    conns: list[EchoConn] = []
    indexes = iter(range(first_idx, first_idx + count))

    async def worker() -> None:
        for i in indexes:
            source = (SOURCE_ADDRESSES[i % len(SOURCE_ADDRESSES)], 0)
            try:
                _, conn = await ws_connect(
                    lambda i=i: EchoConn(run, i),
                    url_of(i),
                    websocket_handshake_timeout=10,
                    local_addr=source,
                    ssl_context=ssl_context,
                    extra_headers=OFFER if run.deflate else None,
                )
            except Exception as exc:  # noqa: BLE001 - every failure is counted and ends the run
                run.error("connect_failed", f"{type(exc).__name__}: {exc}"[:200])
                return
            assert isinstance(conn, EchoConn)  # what the factory made
            conns.append(conn)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, count))]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout)
    except TimeoutError:
        run.error("connect_timeout", f"{len(conns)} of {count} open after {timeout:g}s")
    return conns


async def drain(run: Run, conns: list[EchoConn], what: str) -> None:
    run.sending = False
    if not await wait_until(lambda: not any(c.inflight for c in conns) or bool(run.errors), DRAIN_TIMEOUT):
        left = sum(len(c.inflight) for c in conns)
        run.error("drain_timeout", f"{what}: {left} echoes missing after {DRAIN_TIMEOUT:g}s")


async def echo_once(run: Run, conns: list[EchoConn]) -> None:
    """One message on each connection, so state a server creates on first traffic is there too."""
    for c in conns:
        c.send_next()
    await drain(run, conns, "one echo per connection")


async def close_conns(conns: Iterable[EchoConn]) -> None:
    conns = [c for c in conns if not c.closed]
    for c in conns:
        c.closing = True
        if not c.transport.is_close_frame_sent:
            c.transport.send_close(WSCloseCode.OK)
    await wait_until(lambda: all(c.closed for c in conns), CLOSE_TIMEOUT, step=0.02)
    for c in conns:
        if not c.closed:
            c.transport.disconnect(graceful=False)
    await asyncio.sleep(0)
