"""TLS (issue 14 part 2): https:// and wss:// from ``Server``, with a CA and certificates made
by trustme and real clients that verify them; the admin listener over TLS; the certificate
re-read on SIGHUP (``Server.apply``), open connections keeping their session."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import ssl

import attrs
import pytest
import trustme
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from tests.helpers import RawClient, Recorder, ServerProcess, constructions, probe_app, until
from wsecho.api.websocket import link_of
from wsecho.core.errors import ConfigError
from wsecho.core.lifecycle import ObjectState
from wsecho.serve.config import Settings, build_parser, settings_from
from wsecho.serve.server import Server

MiB = 1024 * 1024


class Certs:
    """A CA and a certificate for 127.0.0.1 it issued, written where --certfile/--keyfile read."""

    def __init__(self, directory) -> None:
        self.certfile = str(directory / "cert.pem")
        self.keyfile = str(directory / "key.pem")
        self.ca = self.issue()

    def issue(self) -> trustme.CA:
        """(Re)write the files with a certificate from a new CA; return that CA."""
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        with open(self.certfile, "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(self.keyfile)
        return ca


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` only."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path)


@contextlib.asynccontextmanager
async def tls_server(recorder, certs, **settings):
    server = Server(
        probe_app(recorder),
        Settings(port=0, data_dir=":memory:", certfile=certs.certfile, keyfile=certs.keyfile, **settings),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def wss(server, path="/obj/room/ws"):
    return f"wss://127.0.0.1:{server.port}{path}"


@pytest.mark.gen_test(timeout=20)
async def test_wss_echo_and_a_large_message_with_a_verified_certificate(certs):
    recorder = Recorder()
    async with (
        tls_server(recorder, certs, max_message_size=4 * MiB) as server,
        connect(wss(server), ssl=trusting(certs.ca), max_size=8 * MiB) as ws,
    ):
        await ws.send("hello")
        assert await ws.recv() == "echo:hello"
        # The object saw an https:// request URL: the scheme is the connection's.
        (link,) = server.runtime.find("PROBE", "room").sockets
        assert link.ws.url == f"https://127.0.0.1:{server.port}/obj/room/ws"
        await ws.send(b"\x00\x01")
        assert await ws.recv() == b"echo:\x00\x01"
        big = "x" * (3 * MiB)  # many TLS records each way
        await ws.send(big)
        assert await ws.recv() == "echo:" + big


@pytest.mark.gen_test(timeout=20)
async def test_a_client_that_does_not_trust_the_ca_is_refused(certs):
    async with tls_server(Recorder(), certs) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(wss(server), ssl=trusting(trustme.CA())):
                pass
        # and the server keeps serving those that do
        async with connect(wss(server), ssl=trusting(certs.ca)) as ws:
            await ws.send("after")
            assert await ws.recv() == "echo:after"


@pytest.mark.gen_test(timeout=20)
async def test_https_requests_and_the_request_url_scheme(certs):
    async with tls_server(Recorder(), certs) as server:
        client = AsyncHTTPClient()
        response = await client.fetch(
            f"https://127.0.0.1:{server.port}/obj/a/other", ssl_options=trusting(certs.ca), raise_error=False
        )
        assert response.code == 200
        assert response.body == b"probe"


@pytest.mark.gen_test(timeout=20)
async def test_hibernation_keeps_the_tls_socket_open(certs):
    recorder = Recorder()
    async with tls_server(recorder, certs) as server:
        runtime = server.runtime
        async with connect(wss(server, "/obj/h/ws"), ssl=trusting(certs.ca)) as ws:
            await ws.send("one")
            assert await ws.recv() == "echo:one"
            host = runtime.find("PROBE", "h")
            assert runtime.sweep(now=runtime.clock() + 3600) == 1
            assert host.lifecycle.state is ObjectState.HIBERNATING
            await ws.send("two")
            assert await ws.recv() == "echo:two"
            assert len(constructions(recorder, "h")) == 2
            (link,) = host.sockets
            assert link_of(link.ws) is link


@pytest.mark.gen_test(timeout=20)
async def test_close_codes_both_ways_over_tls(certs):
    recorder = Recorder()
    async with tls_server(recorder, certs) as server:
        async with connect(wss(server, "/obj/c/ws"), ssl=trusting(certs.ca)) as ws:
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert (ws.close_code, ws.close_reason) == (4000, "bye")
        async with connect(wss(server, "/obj/c/ws"), ssl=trusting(certs.ca)) as ws:
            await ws.close(4321, "client leaving")
        closes = await recorder.wait_for(lambda r: [e for e in r.of("close") if e[1] == 4321])
        assert closes[0][1:4] == (4321, "client leaving", True)


@pytest.mark.gen_test(timeout=30)
async def test_a_slow_reader_over_tls_is_cut_with_1008(certs):
    recorder = Recorder()
    # max_queue=1: the client stops reading from the socket after one unread message.
    client = {"ssl": trusting(certs.ca), "max_queue": 1, "max_size": None, "close_timeout": 0.5}
    async with (
        tls_server(recorder, certs, max_outgoing_total=MiB) as server,
        connect(wss(server, "/obj/s/ws"), **client) as ws,
    ):
        await ws.send("hi")
        (link,) = server.runtime.find("PROBE", "s").sockets
        (conn,) = server.connections
        chunk = "y" * 60_000
        for _ in range(2000):  # 120 MB at most: the kernel's and the client's buffers fill first
            if conn.failure is not None:
                break
            link.ws.send(chunk)
            await asyncio.sleep(0)
        (error,) = await recorder.wait_for(lambda r: r.of("error"))
        assert error[:2] == ("error", 1008)
        assert "--max-outgoing-total (1048576 bytes)" in error[2]


@pytest.mark.gen_test(timeout=20)
async def test_the_admin_listener_over_tls(certs):
    async with tls_server(Recorder(), certs, admin_port=0, admin_tls=True) as server:
        response = await AsyncHTTPClient().fetch(
            f"https://127.0.0.1:{server.admin_port}/healthz", ssl_options=trusting(certs.ca), raise_error=False
        )
        assert response.code == 200


@pytest.mark.gen_test(timeout=30)
async def test_sighup_rotates_the_certificate_and_open_connections_keep_theirs(certs, caplog):
    async with tls_server(Recorder(), certs) as server:
        old_ca = certs.ca
        async with connect(wss(server, "/obj/old/ws"), ssl=trusting(old_ca)) as old:
            await old.send("before")
            assert await old.recv() == "echo:before"
            new_ca = certs.issue()  # rotated in place, as certbot does
            assert server.apply(server.settings) == []
            # new handshakes get the new certificate
            async with connect(wss(server, "/obj/new/ws"), ssl=trusting(new_ca)) as new:
                await new.send("fresh")
                assert await new.recv() == "echo:fresh"
            with pytest.raises(ssl.SSLCertVerificationError):
                async with connect(wss(server, "/obj/new/ws"), ssl=trusting(old_ca)):
                    pass
            # the open connection keeps its session
            await old.send("after")
            assert await old.recv() == "echo:after"

            # a bad file keeps the current certificate, and says why
            with open(certs.certfile, "w") as f:
                f.write("not a certificate\n")
            assert server.apply(server.settings) == []
            assert "SIGHUP: keeping the current certificate" in caplog.text
            assert certs.certfile in caplog.text
            async with connect(wss(server, "/obj/new/ws"), ssl=trusting(new_ca)) as new:
                await new.send("still")
                assert await new.recv() == "echo:still"


@pytest.mark.gen_test(timeout=20)
async def test_turning_tls_on_or_off_needs_a_restart(certs):
    async with tls_server(Recorder(), certs) as server:
        assert sorted(server.apply(attrs.evolve(server.settings, certfile="", keyfile=""))) == ["certfile", "keyfile"]
        assert server.settings.certfile == certs.certfile


def resolve(argv, environ=None):
    return settings_from(build_parser().parse_args(argv), environ or {})


def test_certfile_and_keyfile_come_together(tmp_path):
    with pytest.raises(ConfigError, match="--certfile/--keyfile: --certfile is set but --keyfile is not"):
        resolve(["--certfile", "c.pem"])
    with pytest.raises(ConfigError, match="--keyfile is set but --certfile is not"):
        resolve([], {"WSECHO_KEYFILE": "k.pem"})
    with pytest.raises(ConfigError, match="--admin-tls: on needs --certfile and --keyfile"):
        resolve(["--admin-tls", "on"])
    path = tmp_path / "wsecho.toml"
    path.write_text('certfile = "c.pem"\nkeyfile = "k.pem"\n')
    settings = resolve(["--config", str(path)])
    assert (settings.certfile, settings.keyfile, settings.admin_tls) == ("c.pem", "k.pem", False)


@pytest.mark.gen_test
async def test_unreadable_or_bad_files_are_start_up_errors_naming_the_file(certs, tmp_path):
    missing = str(tmp_path / "missing.pem")
    cases = [
        ({"certfile": missing}, f"--certfile {missing}: cannot read it"),
        ({"keyfile": missing}, f"--keyfile {missing}: cannot read it"),
        ({"keyfile": certs.certfile}, f"--certfile {certs.certfile}: not a PEM certificate chain"),
    ]
    for change, message in cases:
        settings = Settings(port=0, data_dir=":memory:", certfile=certs.certfile, keyfile=certs.keyfile)
        server = Server(probe_app(Recorder()), attrs.evolve(settings, **change))
        with pytest.raises(ConfigError) as raised:
            await server.start()
        assert message in str(raised.value)
        assert "\n" not in str(raised.value)


@pytest.mark.gen_test(timeout=20)
async def test_frames_sent_with_the_upgrade_request_are_not_lost(certs):
    # Tornado's SSLIOStream read them with the request: the take-over must hand them over.
    async with tls_server(Recorder(), certs) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=trusting(certs.ca))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        request = (
            f"GET /obj/early/ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        mask = b"\x01\x02\x03\x04"
        frames = b"".join(
            bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
            for text in (b"one", b"two")
        )
        writer.write(request + frames)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        replies = [await asyncio.wait_for(reader.readexactly(2 + len("echo:one")), 5) for _ in range(2)]
        assert replies == [b"\x81\x08echo:one", b"\x81\x08echo:two"]
        writer.transport.abort()


@pytest.fixture
def process(tmp_path):
    started = []

    def start(*args):
        server = ServerProcess(["--port", "0", "--data-dir", ":memory:", *args])
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_python_m_wsecho_serves_wss_and_rotates_on_sighup(certs, process):
    server = process("--certfile", certs.certfile, "--keyfile", certs.keyfile).ready()
    assert any(f"on https://127.0.0.1:{server.port} " in line for line in server.seen)
    url = server.url("/websocket", "wss")
    old_ca = certs.ca
    with sync_connect(url, ssl=trusting(old_ca), open_timeout=5) as old:
        old.send("before")
        assert old.recv(timeout=5) == "[Durable Object]: before"
        new_ca = certs.issue()
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(rf"SIGHUP: certificate re-read from {re.escape(certs.certfile)}")
        with sync_connect(url, ssl=trusting(new_ca), open_timeout=5) as new:
            new.send("new")
            assert new.recv(timeout=5) == "[Durable Object]: new"
        old.send("after")
        assert old.recv(timeout=5) == "[Durable Object]: after"


def test_python_m_wsecho_with_a_missing_key_exits_2_naming_it(certs, process, tmp_path):
    missing = str(tmp_path / "nope.pem")
    server = process("--certfile", certs.certfile, "--keyfile", missing)
    assert server.proc.wait(timeout=20) == 2  # bad configuration, like every bad setting
    server.wait_for(rf"cannot start: --keyfile {re.escape(missing)}: cannot read it: No such file or directory")


@pytest.mark.gen_test(timeout=20)
async def test_a_client_that_never_starts_the_tls_handshake_is_cut_after_the_handshake_timeout(certs):
    # The TLS handshake happens inside Tornado's wait for the request headers (slowloris).
    async with tls_server(Recorder(), certs, handshake_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_reader_that_falls_behind_and_catches_up_gets_every_message_in_order(certs):
    # Past the kernel's buffers the TLS transport queues, retries the TLS write it could not
    # finish, pauses and resumes the connection's writing: nothing is lost or reordered.
    recorder = Recorder()
    async with tls_server(recorder, certs) as server:
        raw = await RawClient.connect(server.port, "/obj/behind/ws", ssl=trusting(certs.ca))
        assert raw.status == 101
        raw.writer.transport.pause_reading()
        raw.send_frame(0x1, b"hi")
        await recorder.wait_for(lambda r: r.of("message"))
        (link,) = server.runtime.find("PROBE", "behind").sockets
        (conn,) = server.connections
        size, sent = 100_000, 0
        while conn.transport.get_write_buffer_size() < 2 * MiB:
            assert sent < 600, "the server's TLS queue did not fill"
            link.ws.send(f"{sent:08d}".ljust(size, "z"))
            sent += 1
            await asyncio.sleep(0)
        assert conn.backed_up  # the transport paused the connection's writing
        raw.writer.transport.resume_reading()
        assert await raw.read_frame() == (0x1, b"echo:hi")
        for i in range(sent):
            opcode, payload = await raw.read_frame(timeout=10)
            assert (opcode, len(payload), payload[:8]) == (0x1, size, f"{i:08d}".encode())
        await until(lambda: not conn.backed_up)  # and resumed it once the queue drained
        assert conn.transport.get_write_buffer_size() == 0
        raw.send_frame(0x1, b"still")
        assert await raw.read_frame() == (0x1, b"echo:still")
        raw.abort()


@pytest.mark.gen_test(timeout=60)
async def test_a_16_mib_echo_is_not_cut_as_a_slow_reader(certs):
    # Autobahn 9.1.6 over wss://: the echo of a 16 MiB message, written while the client reads.
    # Only what has not left may count against the 16 MiB a peer may have queued.
    recorder = Recorder()
    async with (
        tls_server(recorder, certs, max_message_size=16 * MiB) as server,
        connect(wss(server, "/obj/big/ws"), ssl=trusting(certs.ca), max_size=32 * MiB) as ws,
    ):
        big = b"b" * (16 * MiB)
        await ws.send(big)
        assert await ws.recv() == b"echo:" + big
        assert recorder.of("error") == []


class StubLoop:
    """The loop calls TLSTransport makes, recorded; nothing runs by itself."""

    def __init__(self):
        self.soon = []

    def add_reader(self, fd, callback):
        pass

    def remove_reader(self, fd):
        pass

    def call_soon(self, callback, *args):
        self.soon.append((callback, args))


class RecordsSocket:
    """An SSLSocket stand-in whose recv returns one TLS record a call, like OpenSSL."""

    def __init__(self, records):
        self.records = list(records)

    def getpeername(self):
        return ("127.0.0.1", 1)

    def fileno(self):
        return -1

    def pending(self):
        return 0

    def recv(self, n):
        if not self.records:
            raise ssl.SSLWantReadError
        return self.records.pop(0)


class Collecting(asyncio.Protocol):
    def __init__(self):
        self.pieces = []

    def data_received(self, data):
        self.pieces.append(data)


def test_the_records_of_one_wake_up_reach_the_protocol_joined_up_to_the_pass_budget():
    # A 16 MiB frame arriving as 1,024 records must not reach the frame parser in 1,024 pieces
    # (its join grows with the square of the pieces: Autobahn 9.1.6 blocked the loop 1.5 s).
    from wsecho.serve.tls import READ_PASS_BYTES, TLSTransport

    record = 16 * 1024
    count = READ_PASS_BYTES // record + 3
    sock = RecordsSocket(bytes([i]) * record for i in range(count))
    protocol, loop = Collecting(), StubLoop()
    transport = TLSTransport(sock, protocol, loop)
    (first_read, _) = loop.soon.pop()  # bytes already decrypted are read on start
    first_read()
    assert [len(p) for p in protocol.pieces] == [READ_PASS_BYTES]  # one piece, up to the budget
    (next_read, _) = loop.soon.pop()  # the rest after the others' turn
    next_read()
    assert [len(p) for p in protocol.pieces] == [READ_PASS_BYTES, 3 * record]
    assert b"".join(protocol.pieces) == b"".join(bytes([i]) * record for i in range(count))
    assert transport.is_reading()


@pytest.mark.gen_test(timeout=20)
async def test_compression_over_tls(certs):
    # The TLS path builds its connection like the plain one: a socket that agreed on
    # permessage-deflate gets compressed frames over TLS too.
    recorder = Recorder()
    async with (
        tls_server(recorder, certs, compression=True) as server,
        connect(wss(server), ssl=trusting(certs.ca)) as ws,  # websockets offers permessage-deflate
    ):
        assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
        await ws.send("hello " * 100)
        assert await ws.recv() == "echo:" + "hello " * 100
        (link,) = server.runtime.find("PROBE", "room").sockets
        assert "permessage-deflate" in link.ws.extensions
