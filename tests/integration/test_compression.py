"""permessage-deflate (RFC 7692) through real clients: negotiation, echo both ways, limits,
hibernation, and an idle compressed socket that holds no zlib state."""

import gc
import json
import os
import struct
import tracemalloc
import zlib
from contextlib import asynccontextmanager

import pytest
from tornado.websocket import websocket_connect
from websockets.asyncio.client import connect

from tests.apps.lab import lab_app
from tests.conftest import MAX_MESSAGE
from tests.helpers import RawClient
from wsecho.core.lifecycle import ObjectState
from wsecho.serve.connection import DeflateConnection
from wsecho.serve.gateway import make_application

ACCEPTED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


@pytest.fixture
def flags():
    return {}


@pytest.fixture
def wsecho_app(recorder, flags):
    return lab_app(recorder, flags)


@pytest.fixture
def registry():
    return set()


@pytest.fixture
def app(runtime, registry):
    return make_application(runtime, max_message_size=MAX_MESSAGE, registry=registry, compression=True)


@asynccontextmanager
async def raw(port, path, extra=OFFER):
    """A RawClient for the duration of a block, aborted after it."""
    client = await RawClient.connect(port, path, extra)
    try:
        yield client
    finally:
        client.abort()


def deflated(data: bytes) -> bytes:
    """A message payload as a client compresses it (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def read_raw(client: RawClient) -> tuple[int, bytes]:
    """The next frame as (first byte, payload), RSV1 included."""
    head = await client.reader.readexactly(2)
    n = head[1] & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await client.reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await client.reader.readexactly(8))
    return head[0], await client.reader.readexactly(n)


def inflated(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


@pytest.mark.gen_test
async def test_websockets_client_negotiates_and_echoes_large_messages_both_ways(url):
    text = json.dumps([{"id": i, "name": f"user {i}", "tags": ["a", "b"]} for i in range(1000)])
    data = bytes(range(256)) * 100
    async with connect(url("/lab/z/ws", "ws"), max_size=None) as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == ACCEPTED
        await ws.send('{"op": "extensions"}')
        assert json.loads(await ws.recv()) == {"ok": ACCEPTED}
        await ws.send(text)
        assert await ws.recv() == "echo:" + text
        await ws.send(data)
        assert await ws.recv() == b"binary:" + data
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"


@pytest.mark.gen_test
async def test_tornado_client_with_compression_echoes(url):
    ws = await websocket_connect(url("/lab/t/ws", "ws"), compression_options={})
    try:
        assert "permessage-deflate" in ws.headers.get("Sec-WebSocket-Extensions", "")
        text = "tornado " * 5000
        await ws.write_message(text)
        assert await ws.read_message() == "echo:" + text
    finally:
        ws.close()


@pytest.mark.gen_test
async def test_the_server_compresses_with_rsv1_and_inflates_fragmented_messages(port):
    async with raw(port, "/lab/r/ws", OFFER) as client:
        assert client.headers["sec-websocket-extensions"] == ACCEPTED
        text = ("abc" * 1000).encode()
        packed = deflated(text)
        # a compressed message in three fragments: RSV1 on the first only
        client.send_frame(0x1 | 0x40, packed[:10], fin=False)
        client.send_frame(0x0, packed[10:20], fin=False)
        client.send_frame(0x0, packed[20:])
        b0, payload = await read_raw(client)
        assert b0 == 0x80 | 0x40 | 0x1  # final, compressed, text
        assert inflated(payload) == b"echo:" + text
        assert len(payload) < len(text) // 10
        # small and incompressible messages go out compressed too (kosoku fails plain echoes)
        noise = os.urandom(3000)
        client.send_frame(0x1, b"s")
        client.send_frame(0x2, noise)
        b0, payload = await read_raw(client)
        assert (b0, inflated(payload)) == (0xC1, b"echo:s")
        b0, payload = await read_raw(client)
        assert (b0, inflated(payload)) == (0xC2, b"binary:" + noise)


@pytest.mark.gen_test
async def test_no_offer_no_extension(port):
    async with raw(port, "/lab/n/ws", "") as client:
        assert client.status == 101
        assert "sec-websocket-extensions" not in client.headers
        client.send_frame(0x1, b"x" * 200)
        b0, payload = await read_raw(client)
        assert (b0, payload) == (0x81, b"echo:" + b"x" * 200)
        client.send_frame(0x1, b'{"op": "extensions"}')
        assert (await read_raw(client))[1] == b'{"ok": ""}'


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        ("permessage-deflate; server_max_window_bits=10", ACCEPTED + "; server_max_window_bits=10"),
        # an offer the server cannot accept is skipped; the next one is taken
        ("permessage-deflate; server_max_window_bits=7, permessage-deflate", ACCEPTED),
        # none acceptable: the handshake succeeds without the extension
        ("permessage-deflate; mystery=1", None),
        ("x-webkit-deflate-frame", None),
    ],
)
@pytest.mark.gen_test
async def test_negotiation_honours_or_declines_offers(port, offer, answer):
    async with raw(port, "/lab/o/ws", f"Sec-WebSocket-Extensions: {offer}\r\n") as client:
        assert client.status == 101
        assert client.headers.get("sec-websocket-extensions") == answer


@pytest.mark.gen_test
async def test_window_bits_are_honoured_when_sending(port):
    offer = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n"
    async with raw(port, "/lab/w/ws", offer) as client:
        text = bytes(range(32, 127)) * 200
        client.send_frame(0x1, text)
        _, payload = await read_raw(client)
        # a client with a 512-byte window inflates it
        assert zlib.decompressobj(-9).decompress(payload + b"\x00\x00\xff\xff") == b"echo:" + text


@pytest.mark.gen_test
async def test_a_broadcast_reaches_plain_and_compressed_sockets_each_in_its_encoding(port):
    small = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n"
    async with (
        raw(port, "/lab/b/ws", "") as plain,
        raw(port, "/lab/b/ws") as first,
        raw(port, "/lab/b/ws") as second,
        raw(port, "/lab/b/ws", small) as narrow,
    ):
        text = "".join(chr(32 + i % 95) for i in range(20_000))
        plain.send_frame(0x1, json.dumps({"op": "broadcast", "text": text}).encode())
        assert await read_raw(plain) == (0x81, text.encode())
        b0, one = await read_raw(first)
        b0_again, two = await read_raw(second)
        # the same window: the frame compressed once for both (no context takeover)
        assert (b0, b0_again) == (0xC1, 0xC1)
        assert one == two
        assert inflated(one) == text.encode()
        b0, payload = await read_raw(narrow)
        assert b0 == 0xC1
        assert zlib.decompressobj(-9).decompress(payload + b"\x00\x00\xff\xff") == text.encode()
        assert json.loads((await read_raw(plain))[1]) == {"ok": 4}


@pytest.mark.gen_test
async def test_a_zip_bomb_is_cut_with_1009(port):
    async with raw(port, "/lab/b/ws", OFFER) as client:
        bomb = deflated(b"\x00" * (64 * MAX_MESSAGE))  # 4 MiB of zeros in about 4 KiB
        assert len(bomb) < MAX_MESSAGE
        client.send_frame(0x2 | 0x40, bomb)
        code, reason = await client.read_close()
        assert code == 1009
        assert f"inflates to more than {MAX_MESSAGE} bytes" in reason


@pytest.mark.parametrize("opcode", [0x9, 0xA])
@pytest.mark.gen_test
async def test_rsv1_on_a_control_frame_is_1002(port, opcode):
    async with raw(port, "/lab/c/ws", OFFER) as client:
        client.send_frame(opcode | 0x40, b"hi")
        assert (await client.read_close())[0] == 1002


@pytest.mark.gen_test
async def test_compression_off_or_the_applications_101_decides(port, app):
    # --compression on, but this 101 names no permessage-deflate: none for this socket
    async with raw(port, "/lab/a/ws?extensions=none", OFFER) as client:
        assert client.status == 101
        assert "sec-websocket-extensions" not in client.headers
    app.connections.compression = False  # --compression off
    async with raw(port, "/lab/a/ws", OFFER) as client:
        assert "sec-websocket-extensions" not in client.headers
    # ... unless the application's 101 asks for it
    async with raw(port, "/lab/a/ws?extensions=permessage-deflate", OFFER) as client:
        assert client.headers["sec-websocket-extensions"] == ACCEPTED


@pytest.mark.gen_test
async def test_auto_response_and_hibernation_with_compressed_sockets(url, runtime, clock, recorder):
    long = "ping " * 40
    async with connect(url("/lab/h/ws", "ws")) as ws:
        await ws.send(json.dumps({"op": "set_auto", "request": long, "response": long.upper()}))
        assert json.loads(await ws.recv()) == {"ok": None}
        host = runtime.find("LAB", "h")
        runtime.sweep(now=clock.monotonic() + 10)
        assert host.lifecycle.state is ObjectState.HIBERNATING
        await ws.send(long)  # compressed by the client, inflated, matched: the object sleeps on
        assert await ws.recv() == long.upper()
        assert host.lifecycle.state is ObjectState.HIBERNATING
        text = "wake " * 1000
        await ws.send(text)
        assert await ws.recv() == "echo:" + text
        assert host.lifecycle.state is ObjectState.ACTIVE


def _held(snapshot_before, snapshot_after) -> int:
    stats = snapshot_after.compare_to(snapshot_before, "filename")
    return sum(s.size_diff for s in stats if s.size_diff > 0)


async def _idle_sockets(port, runtime, clock, name, extra, n=20) -> int:
    """Bytes the server still holds for ``n`` sockets that each echoed 4 KiB, once hibernated."""
    message = b"x" * 4096
    gc.collect()
    before = tracemalloc.take_snapshot()
    clients = [await RawClient.connect(port, f"/lab/{name}/ws", extra) for _ in range(n)]
    for client in clients:
        client.send_frame(0x1, message)
        await read_raw(client)
    runtime.sweep(now=clock.monotonic() + 10)
    gc.collect()
    after = tracemalloc.take_snapshot()
    for client in clients:
        client.abort()
    return _held(
        before.filter_traces([tracemalloc.Filter(True, "*wsecho*")]),
        after.filter_traces([tracemalloc.Filter(True, "*wsecho*")]),
    )


@pytest.mark.gen_test
async def test_an_idle_compressed_socket_holds_no_zlib_state(port, runtime, clock, registry):
    tracemalloc.start()
    try:
        plain = await _idle_sockets(port, runtime, clock, "plain", "")
        compressed = await _idle_sockets(port, runtime, clock, "packed", OFFER)
    finally:
        tracemalloc.stop()
    held = [c for c in registry if isinstance(c, DeflateConnection)]
    assert held
    for conn in held:
        attributes = [getattr(conn, slot, None) for cls in type(conn).__mro__ for slot in getattr(cls, "__slots__", ())]
        attributes += [getattr(conn.parser, slot, None) for slot in type(conn.parser).__slots__]
        assert not [a for a in attributes if type(a).__module__ == "zlib"]
    assert compressed <= 2 * plain, (compressed, plain)
