"""Every row of the bad-input table in docs/operations.md: what a broken, slow or hostile client gets."""

import asyncio
import struct

import pytest

from tests.core.test_frames import client_frame
from tests.helpers import RawClient, probe_app
from wsecho.core.frames import MAX_FRAGMENTS
from wsecho.serve.config import Settings
from wsecho.serve.gateway import make_application
from wsecho.serve.server import Server

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.fixture
def wsecho_app(recorder):
    return probe_app(recorder)


@pytest.fixture
def app(runtime):
    # small limits so that the tests reach them quickly
    return make_application(
        runtime,
        max_message_size=1000,
        max_outgoing=64 * 1024,
        close_timeout=0.3,
        allowed_origins=("https://ok.example",),
    )


async def http_exchange(port, request: bytes, timeout=5.0) -> bytes:
    """Send ``request``; return the response head and body (or what came before the server hung up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return head + await asyncio.wait_for(reader.readexactly(length), timeout)
    finally:
        writer.transport.abort()


def upgrade(path="/obj/x/ws", extra=""):
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


async def final_event(recorder):
    await recorder.wait_for(lambda r: [e for e in r.events if e[0] in ("close", "error")])
    return [e for e in recorder.events if e[0] in ("close", "error")]


# -- the handshake ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_origin_not_allowed_is_403(port):
    answer = await http_exchange(port, upgrade(extra="Origin: https://evil.example\r\n"))
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"Origin 'https://evil.example' is not allowed to open WebSockets here" in answer


@pytest.mark.parametrize("origin", ["https://ok.example", "https://OK.example/", "http://127.0.0.1:{port}"])
@pytest.mark.gen_test
async def test_allowed_and_same_origin_upgrade(port, origin):
    raw = await RawClient.connect(port, "/obj/x/ws", extra=f"Origin: {origin.format(port=port)}\r\n")
    assert raw.status == 101
    raw.abort()


@pytest.mark.gen_test
async def test_full_server_is_503_before_the_upgrade(recorder, tmp_path):
    server = Server(probe_app(recorder), Settings(port=0, max_connections=1, data_dir=":memory:"))
    await server.start()
    try:
        first = await RawClient.connect(server.port, "/obj/x/ws")
        assert first.status == 101
        answer = await http_exchange(server.port, upgrade())
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"at its limit of 1 WebSocket connections" in answer
        assert recorder.of("constructor") == [("constructor", "x", 0)]  # the app never saw the second
        first.abort()
    finally:
        await server.stop()


@pytest.mark.gen_test(timeout=10)
async def test_a_client_that_dribbles_its_headers_is_cut(recorder):
    server = Server(probe_app(recorder), Settings(port=0, handshake_timeout=0.3, data_dir=":memory:"))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = asyncio.get_running_loop().time()
        for _ in range(50):  # one header every 0.1 s, never finishing
            writer.write(b"X-Slow: 1\r\n")
            await asyncio.sleep(0.1)
            if reader.at_eof() or writer.is_closing():
                break
            with_timeout = asyncio.ensure_future(reader.read(1))
            done, _ = await asyncio.wait([with_timeout], timeout=0)
            if done:
                break
            with_timeout.cancel()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert asyncio.get_running_loop().time() - started < 3
        writer.transport.abort()
    finally:
        await server.stop()


@pytest.mark.gen_test
async def test_oversized_request_headers_are_refused(recorder):
    server = Server(probe_app(recorder), Settings(port=0, data_dir=":memory:"))
    await server.start()
    try:
        big = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        assert await http_exchange(server.port, big) == b""  # Tornado hangs up without an answer
        assert recorder.of("constructor") == []  # the application never saw it
        fine = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
        assert (await http_exchange(server.port, fine)).startswith(b"HTTP/1.1 200 ")
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("extra_headers", "status", "message"),
    [
        ("Connection: keep-alive", 400, 'the "Connection" header must include "Upgrade"'),
        ("Sec-WebSocket-Key: short", 400, "Sec-WebSocket-Key must be 16 bytes in base64"),
        ("Sec-WebSocket-Version: 8", 426, "Sec-WebSocket-Version must be 13"),
    ],
)
@pytest.mark.gen_test
async def test_broken_handshakes(port, extra_headers, status, message):
    headers = {"Connection": "Upgrade", "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}
    name, value = extra_headers.split(": ")
    headers[name] = value
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    answer = await http_exchange(
        port, f"GET /obj/x/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n{lines}\r\n".encode()
    )
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert f"Bad WebSocket handshake: {message}".encode() in answer
    assert b"Traceback" not in answer


# -- frames -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(1, b"x", masked=False), 1002),
        (client_frame(1, b"x", rsv=0x20), 1002),
        (client_frame(5, b"x"), 1002),
        (client_frame(9, b"x", fin=False), 1002),
        (client_frame(9, b"x" * 126), 1002),
        (client_frame(0, b"x"), 1002),
        (client_frame(1, b"a", fin=False) + client_frame(1, b"b"), 1002),
        (client_frame(1, b"ok", fin=False) + client_frame(0, b"\xc3\x28"), 1007),
        (client_frame(8, b"\x03"), 1002),
        (client_frame(8, struct.pack("!H", 999)), 1002),
        (client_frame(8, struct.pack("!H", 1000) + b"\xc3\x28"), 1007),
        (client_frame(2, b"x" * 1001), 1009),
        (client_frame(2, b"", fin=False) + client_frame(0, b"", fin=False) * MAX_FRAGMENTS, 1009),
    ],
    ids=[
        "unmasked",
        "rsv",
        "opcode",
        "fragmented-control",
        "long-control",
        "lone-continuation",
        "interleaved",
        "utf8-fragment",
        "one-byte-close",
        "close-code",
        "close-reason-utf8",
        "too-big",
        "fragment-flood",
    ],
)
@pytest.mark.gen_test
async def test_protocol_violations_close_with_their_code_and_report_an_error(port, recorder, data, code):
    raw = await RawClient.connect(port, "/obj/x/ws")
    raw.writer.write(data)
    assert (await raw.read_close())[0] == code
    await raw.wait_closed()  # the server sends FIN after its Close and drains
    events = await final_event(recorder)
    assert [e[:2] for e in events] == [("error", code)]


@pytest.mark.gen_test
async def test_a_peer_that_stops_reading_is_cut_with_1008(port, recorder, runtime):
    raw = await RawClient.connect(port, "/obj/x/ws")
    host = runtime.find("PROBE", "x")
    (ws,) = [link.ws for link in host.sockets]
    # The client reads nothing; the kernel buffers fill, then ours, up to the cap.
    raw.writer.transport.pause_reading()
    chunk = "y" * 60_000
    for _ in range(2000):
        if ws.ready_state != 1:
            break
        ws.send(chunk)
        await asyncio.sleep(0)
    events = await final_event(recorder)
    assert events[0][:2] == ("error", 1008)
    assert "the peer read too slowly" in events[0][2]
    raw.abort()


@pytest.mark.gen_test
async def test_a_close_the_peer_never_answers_is_cut_after_the_bound(port, recorder):
    raw = await RawClient.connect(port, "/obj/x/ws")
    raw.send_frame(0x1, b"close-me")
    assert await raw.read_close() == (4000, "bye")
    # never answer: the server gives up after its close timeout (0.3 s here)
    await raw.wait_closed()
    assert await final_event(recorder) == [("close", 1006, "", False, 1)]


@pytest.mark.gen_test(timeout=10)
async def test_a_dead_peer_is_found_by_pings(recorder):
    server = Server(probe_app(recorder), Settings(port=0, ping_interval=0.2, ping_timeout=0.2, data_dir=":memory:"))
    await server.start()
    try:
        raw = await RawClient.connect(server.port, "/obj/x/ws")
        # a live peer answers the server's ping and stays
        opcode, payload = await raw.read_frame()
        assert opcode == 0x9
        raw.send_frame(0xA, payload)
        assert recorder.of("close") == []
        # a dead one (reads nothing, answers nothing) is cut: its close code is 1006
        raw.writer.transport.pause_reading()
        events = await final_event(recorder)
        assert events == [("close", 1006, "", False, 1)]
        assert server.runtime.stats.dead_peers == 1
        raw.abort()
    finally:
        await server.stop()
