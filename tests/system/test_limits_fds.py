"""Limits at the socket level: descriptors, connection counts, request-body memory, backlog.

Each finding of the red team's report (issue 11: H2, M1, M3, L7) has its test here.
"""

import asyncio
import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.helpers import RawClient, ServerProcess, probe_app, until
from tests.integration.test_bad_input import http_exchange
from tests.integration.test_operations import metric, resolve
from wsecho.core.errors import ConfigError
from wsecho.serve.acceptor import Acceptor
from wsecho.serve.config import Settings
from wsecho.serve.server import Server


@contextlib.asynccontextmanager
async def serving(recorder, **settings):
    server = Server(probe_app(recorder), Settings(port=0, data_dir=":memory:", **settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def drop(writer):
    """Cut a test connection (close marks the writer closed even when the peer left first)."""
    writer.close()
    writer.transport.abort()


async def read_answer(raw: RawClient) -> bytes:
    """The body after the head RawClient.connect read (for a refused upgrade)."""
    length = int(raw.headers.get("content-length", "0"))
    return await asyncio.wait_for(raw.reader.readexactly(length), 5)


# -- M1: the WebSocket slot is taken before the upgrade awaits anything ----------------------


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_upgrades_never_exceed_max_connections(recorder):
    async with serving(recorder, max_connections=100) as server:
        seen = []

        async def watch():
            while True:
                seen.append(len(server.connections))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        # 600 upgrades at once, to 600 objects: every fetch awaits before its socket is open.
        results = await asyncio.gather(
            *(RawClient.connect(server.port, f"/obj/o{i}/ws") for i in range(600)), return_exceptions=True
        )
        watcher.cancel()
        clients = [r for r in results if isinstance(r, RawClient)]
        assert len(clients) == 600, [r for r in results if not isinstance(r, RawClient)][:3]
        opened = [c for c in clients if c.status == 101]
        refused = [c for c in clients if c.status != 101]
        assert 0 < len(opened) <= 100
        assert max(seen) <= 100
        assert {c.status for c in refused} == {503}
        assert b"at its limit of 100 WebSocket connections" in await read_answer(refused[0])
        await until(lambda: len(server.connections) == len(opened))
        for client in clients:
            client.abort()
        # The slots come back: once the peers are gone, an upgrade is accepted again.
        await until(lambda: server.runtime.socket_count() == 0, timeout=10)
        again = await RawClient.connect(server.port, "/obj/again/ws")
        assert again.status == 101
        again.abort()


@pytest.mark.gen_test
async def test_a_refused_or_failed_upgrade_gives_its_slot_back(recorder):
    async with serving(recorder, max_connections=1) as server:
        # The application refuses to upgrade /obj/x/plain (it answers 200): the slot is freed.
        for _ in range(3):
            answer = await http_exchange(server.port, upgrade_request("/obj/x/plain"))
            assert answer.startswith(b"HTTP/1.1 200 ")
        first = await RawClient.connect(server.port, "/obj/x/ws")
        assert first.status == 101
        second = await RawClient.connect(server.port, "/obj/y/ws")
        assert second.status == 503
        first.abort()
        second.abort()


def upgrade_request(path):
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


# -- M3: request bodies in memory are bounded across connections ------------------------------


async def start_body(port, length, sent=1024, chunked=False):
    """Open a POST that declares ``length`` body bytes and sends ``sent`` of them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if chunked:
        head = b"POST /obj/b/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"%x\r\n" % sent + b"b" * sent + b"\r\n")
    else:
        writer.write(b"POST /obj/b/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % length + b"b" * sent)
    await writer.drain()
    return reader, writer


async def answer_of(reader, timeout=5.0):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    return head + await asyncio.wait_for(reader.readexactly(length), timeout)


@pytest.mark.gen_test(timeout=30)
async def test_incomplete_bodies_cannot_hold_more_than_the_budget(recorder):
    mib = 1024 * 1024
    async with serving(recorder, max_body_memory=4 * mib) as server:
        peers = [await start_body(server.port, mib) for _ in range(20)]
        # The first four reserved their whole declared body; the others were answered at once.
        refused = []
        for reader, _ in peers[4:]:
            refused.append(await answer_of(reader))
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in refused)
        assert b"at its limit of 4194304 bytes of request bodies in memory (--max-body-memory)" in refused[0]
        assert b"this request needs 1048576 more" in refused[0]
        assert b"Connection: close" in refused[0]
        stats = server.listener_stats()
        assert stats.body_bytes == 4 * mib
        assert stats.refused["body_memory"] == 16
        for _, writer in peers:
            drop(writer)
        await until(lambda: server.listener_stats().body_bytes == 0)
        # With the budget free again, a whole body is read and handed to the application.
        reader, writer = await start_body(server.port, 1000, sent=1000)
        assert (await answer_of(reader)).startswith(b"HTTP/1.1 200 ")
        drop(writer)
        await until(lambda: server.listener_stats().body_bytes == 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_chunked_body_is_counted_as_it_arrives(recorder):
    async with serving(recorder, max_body_memory=100_000) as server:
        first_reader, first = await start_body(server.port, 0, sent=60_000, chunked=True)
        await until(lambda: server.listener_stats().body_bytes == 60_000)
        reader, writer = await start_body(server.port, 0, sent=60_000, chunked=True)
        answer = await answer_of(reader)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"this request needs 60000 more" in answer
        assert server.listener_stats().body_bytes == 60_000
        first.write(b"0\r\n\r\n")  # the first one finishes and is answered
        assert (await answer_of(first_reader)).startswith(b"HTTP/1.1 200 ")
        await until(lambda: server.listener_stats().body_bytes == 0)
        drop(first)
        drop(writer)


# -- H2: every HTTP connection counts; idle keep-alive ones are closed ------------------------


async def keep_alive_get(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /obj/k/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return await answer_of(reader), reader, writer


@pytest.mark.gen_test(timeout=30)
async def test_keep_alive_connections_count_against_max_http_connections(recorder):
    async with serving(recorder, max_http_connections=5) as server:
        held = []
        for _ in range(5):
            answer, reader, writer = await keep_alive_get(server.port)
            assert answer.startswith(b"HTTP/1.1 200 ")
            held.append(writer)
        assert server.listener_stats().http_connections == 5
        answer, reader, writer = await keep_alive_get(server.port)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"at its limit of 5 HTTP connections (--max-http-connections)" in answer
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed
        drop(writer)
        drop(held.pop())
        await until(lambda: server.listener_stats().http_connections == 4)
        answer, _, writer = await keep_alive_get(server.port)
        assert answer.startswith(b"HTTP/1.1 200 ")
        drop(writer)
        for w in held:
            drop(w)
        assert server.listener_stats().refused["http_limit"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_an_idle_keep_alive_connection_is_closed_after_the_handshake_timeout(recorder):
    async with serving(recorder, handshake_timeout=0.3) as server:
        answer, reader, writer = await keep_alive_get(server.port)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        drop(writer)
        await until(lambda: server.listener_stats().http_connections == 0)


# -- H2: out of descriptors, the accept loop pauses instead of spinning -----------------------


class ExhaustedSocket:
    """A listening socket whose accept() fails with EMFILE, like a process out of descriptors."""

    def __init__(self, real):
        self.real = real
        self.accepts = 0

    def fileno(self):
        return self.real.fileno()

    def accept(self):
        self.accepts += 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


@pytest.mark.gen_test
async def test_accept_out_of_descriptors_pauses_the_listener():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.create_connection(listener.getsockname())  # pending: the listener is readable
    sock = ExhaustedSocket(listener)
    pauses = []
    accepted = []
    acceptor = Acceptor(sock, lambda c, a: accepted.append(c), lambda exc, delay: pauses.append(delay), 128)
    try:
        await until(lambda: len(pauses) == 3, timeout=5)
        # Each wake-up tried once, then paused for longer: no retry loop on a readable socket.
        assert sock.accepts == 3
        assert pauses == [0.05, 0.1, 0.2]
        sock.accept = listener.accept  # descriptors are free again
        await until(lambda: accepted, timeout=5)
    finally:
        acceptor.remove()
        client.close()
        listener.close()
        for conn in accepted:
            conn.close()


def limit_descriptors(n):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


def cpu_seconds(pid):
    """The process's user plus system CPU time so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid, seconds=1.5):
    """The share of one core the process used over ``seconds`` of wall time."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # a CPU measurement needs wall time to pass
    return (cpu_seconds(pid) - before) / (time.monotonic() - start)


def drain_lines(server):
    lines = []
    while not server.lines.empty():
        lines.append(server.lines.get_nowait())
    return lines


@pytest.fixture
def process(tmp_path):
    started = []

    def run(*args, preexec_fn=None):
        server = ServerProcess(
            ["--port", "0", "--data-dir", ":memory:", *args], env={"WSECHO_LOG_LEVEL": "info"}, preexec_fn=preexec_fn
        )
        started.append(server)
        return server.ready()

    yield run
    for server in started:
        server.stop()


def flood(port, n):
    """``n`` idle TCP connections (no request) held open by the test."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from Linux /proc")
def test_out_of_descriptors_at_start_the_server_caps_connections_and_does_not_spin(process):
    server = process("--admin-port", "0", preexec_fn=limit_descriptors(64))
    admin_port = int(server.wait_for(r"admin listener on http://127\.0\.0\.1:(\d+)").group(1))
    start_lines = "".join(server.seen)
    assert "open-file limit (ulimit -n): 64" in start_lines
    assert re.search(r"--max-connections 10000 plus --max-http-connections 1000 .* of 64 ", start_lines)
    socks = flood(server.port, 150)
    try:
        server.wait_for(r"closed a new connection at accept|cannot accept connections")
        assert cpu_share(server.proc.pid) < 0.5  # spinning on accept() is a whole core
        assert len(drain_lines(server)) < 10  # one rate-limited warning, not a line per pass
        # The reserve keeps descriptors for the admin listener.
        assert urllib_get(f"http://127.0.0.1:{admin_port}/healthz") == "ok\n"
    finally:
        for s in socks:
            s.close()
    wait_until_connections_closed(admin_port)
    assert server.get("/obj/x/y")[0] == 200  # with the clients gone, new ones are served


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="lowers a running process's limit (Linux)")
def test_out_of_descriptors_while_running_accept_pauses_and_recovers(process):
    server = process("--admin-port", "0")
    admin_port = int(server.wait_for(r"admin listener on http://127\.0\.0\.1:(\d+)").group(1))
    pid = server.proc.pid
    # Other code (the application, storage) took the descriptors: only 3 are left.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 3,) * 2)
    socks = flood(server.port, 50)
    try:
        server.wait_for(r"cannot accept connections: Too many open files \(the open-file limit, ulimit -n, is \d+")
        assert cpu_share(server.proc.pid) < 0.5
        assert len(drain_lines(server)) < 10
    finally:
        for s in socks:
            s.close()
    wait_until_connections_closed(admin_port)
    assert server.get("/obj/x/y")[0] == 200
    assert metric(urllib_get(f"http://127.0.0.1:{admin_port}/metrics"), "wsecho_accept_pauses_total") >= 1


def wait_until_connections_closed(admin_port, timeout=10.0):
    """Poll /metrics (bounded) until the server has seen every test connection close."""
    deadline = time.monotonic() + timeout
    while metric(urllib_get(f"http://127.0.0.1:{admin_port}/metrics"), "wsecho_http_connections_open") > 0:
        assert time.monotonic() < deadline, "the server still counts open HTTP connections"
        time.sleep(0.05)  # another process: there is no event to await


def urllib_get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# -- L7: the listen backlog ----------------------------------------------------------------


def test_backlog_option_defaults_to_2048_and_must_be_positive():
    assert resolve([], {}).backlog == 2048
    assert resolve(["--backlog", "100"], {}).backlog == 100
    assert resolve([], {"WSECHO_BACKLOG": "300"}).backlog == 300
    with pytest.raises(ConfigError, match="--backlog: must be 1 or more, got 0"):
        resolve(["--backlog", "0"], {})


@pytest.mark.skipif(shutil.which("ss") is None, reason="reads the listen queue with ss (iproute2)")
@pytest.mark.gen_test
async def test_backlog_reaches_the_listening_socket(recorder):
    async with serving(recorder, backlog=100) as server:
        # For a listening socket, ss shows the backlog in the Send-Q column.
        out = subprocess.run(
            ["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True, timeout=10
        ).stdout
        assert out.split()[2] == "100", out


def test_no_warning_when_the_limits_fit(caplog):
    settings = Settings(port=0, data_dir=":memory:", max_connections=10, max_http_connections=10)
    server = Server(probe_app(None), settings)
    with caplog.at_level(logging.WARNING, logger="wsecho.serve.server"):
        assert server._fd_cap() > 20
    assert caplog.records == []
