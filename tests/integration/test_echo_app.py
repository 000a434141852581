"""Every row of SPEC §1 against the default application, with real clients on 127.0.0.1."""

import asyncio
import gc
import logging

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect
from websockets.asyncio.client import connect

from tests.helpers import RawClient, until
from wsecho.api.http import Request

#: Served by the standalone gateway, by objects mounted in a Tornado application, and over TLS.
SERVINGS = ("standalone", "tornado", "tls")


USAGE = (
    "\n"
    "This Durable Object supports the following endpoints:\n"
    "  /websocket\n"
    "    - Creates a WebSocket connection, any messages sent to it are echoed with a prefix.\n"
    "  /getCurrentConnections\n"
    "    - A regular HTTP GET endpoint that returns the number of currently connected WebSocket clients.\n"
)


async def get(http_client, url, method="GET", headers=None, body=None):
    return await http_client.fetch(
        HTTPRequest(url, method=method, headers=headers, body=body, allow_nonstandard_methods=True),
        raise_error=False,
    )


async def count(http_client, url):
    response = await get(http_client, url("/getCurrentConnections"))
    assert response.code == 200
    return response.body.decode()


@pytest.mark.parametrize("upgrade", ["websocket", "WebSocket", "WEBSOCKET"])
@pytest.mark.gen_test
async def test_upgrade_in_any_letter_case_is_accepted(port, upgrade, url, http_client):
    raw = await RawClient.connect(port, extra=f"X-Case: {upgrade}\r\n")
    assert raw.status == 101
    raw.abort()
    # and with the header itself in that case (RawClient sends "websocket")
    reader_writer = await _raw_upgrade(port, upgrade)
    assert reader_writer.startswith(b"HTTP/1.1 101 ")


async def _raw_upgrade(port, upgrade_value):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=getattr(port, "tls", None))
    writer.write(
        (
            f"GET /websocket HTTP/1.1\r\nHost: x\r\nUpgrade: {upgrade_value}\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.transport.abort()
    return head


@pytest.mark.parametrize(
    "headers",
    [{}, {"Upgrade": "websocket, foo"}, {"Upgrade": "h2c"}, {"Upgrade": ""}],
    ids=["missing", "list", "h2c", "empty"],
)
@pytest.mark.gen_test
async def test_websocket_without_proper_upgrade_is_426(http_client, url, headers):
    response = await get(http_client, url("/websocket"), headers=headers)
    assert response.code == 426
    assert response.body == b"Durable Object expected Upgrade: websocket"
    assert response.headers["Content-Type"] == "text/plain;charset=UTF-8"


KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        (
            {"Upgrade": "websocket", "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"},
            400,
            'the "Connection" header must include "Upgrade"',
        ),
        (
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
            400,
            "missing Sec-WebSocket-Key",
        ),
        (
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "c2hvcnQ=",
                "Sec-WebSocket-Version": "13",
            },
            400,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ),
        (
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": KEY,
                "Sec-WebSocket-Version": "8",
            },
            426,
            "Sec-WebSocket-Version must be 13",
        ),
    ],
    ids=["no-connection-upgrade", "no-key", "short-key", "old-version"],
)
@pytest.mark.gen_test
async def test_upgrade_with_invalid_handshake_is_refused(http_client, url, headers, status, message):
    response = await get(http_client, url("/websocket"), headers=headers)
    assert response.code == status
    assert response.body.decode() == f"Bad WebSocket handshake: {message}"
    assert response.headers["Content-Type"] == "text/plain;charset=UTF-8"
    if status == 426:
        assert response.headers["Sec-WebSocket-Version"] == "13"
    # the refused socket never counted
    assert await count(http_client, url) == ("There are 0 WebSocket clients connected to this Durable Object instance.")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/websocket?x=1"),
        ("GET", "/websocket/"),
        ("GET", "/WebSocket"),
        ("POST", "/"),
        ("PUT", "/anything"),
        ("DELETE", "/x/y"),
    ],
)
@pytest.mark.gen_test
async def test_anything_else_is_the_usage_text(http_client, url, method, path):
    body = b"" if method in ("POST", "PUT") else None
    response = await get(http_client, url(path), method=method, body=body)
    assert response.code == 200
    assert response.body.decode() == USAGE
    assert response.headers["Content-Type"] == "text/plain;charset=UTF-8"


@pytest.mark.gen_test
async def test_routing_uses_the_full_url_including_the_query(http_client, url):
    response = await get(http_client, url("/any/thing?q=/getCurrentConnections"))
    assert response.body.decode().startswith("There are 0 WebSocket clients")


@pytest.mark.gen_test
async def test_connection_count_texts(http_client, url):
    zero = "There are 0 WebSocket clients connected to this Durable Object instance."
    one = "There is 1 WebSocket client connected to this Durable Object instance."
    two = "There are 2 WebSocket clients connected to this Durable Object instance."
    assert await count(http_client, url) == zero
    async with connect(url("/websocket", "ws")) as a:
        assert await count(http_client, url) == one
        async with connect(url("/websocket", "ws")) as b:
            assert await count(http_client, url) == two
            await b.close()
        assert await count(http_client, url) == one
        await a.close()
    assert await count(http_client, url) == zero


@pytest.mark.gen_test
async def test_text_and_binary_echo(url):
    async with connect(url("/websocket", "ws")) as ws:
        await ws.send("hello")
        assert await ws.recv() == "[Durable Object]: hello"
        await ws.send("")
        assert await ws.recv() == "[Durable Object]: "
        await ws.send("héllo ✓")
        assert await ws.recv() == "[Durable Object]: héllo ✓"
        await ws.send(b"\x00\xffbytes")
        reply = await ws.recv()
        assert isinstance(reply, bytes)
        assert reply == b"[Durable Object]: \x00\xffbytes"


@pytest.mark.gen_test
async def test_echo_goes_to_the_sender_only(url):
    async with connect(url("/websocket", "ws")) as a, connect(url("/websocket", "ws")) as b:
        await a.send("from a")
        await b.send("from b")
        assert await a.recv() == "[Durable Object]: from a"
        assert await b.recv() == "[Durable Object]: from b"


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
@pytest.mark.gen_test
async def test_client_close_is_answered_with_the_same_code(url, http_client, code):
    conn = await websocket_connect(url("/websocket", "ws"))
    conn.close(code, "client leaving")
    assert await conn.read_message() is None
    assert conn.close_code == code
    assert conn.close_reason == "Durable Object is closing WebSocket"
    assert await count(http_client, url) == ("There are 0 WebSocket clients connected to this Durable Object instance.")


@pytest.mark.gen_test
async def test_close_without_status_is_still_completed(url, http_client, port):
    # The handler sees 1005 and its ws.close(1005, ...) raises; the runtime
    # answers with an empty Close so the client never hangs.
    raw = await RawClient.connect(port)
    raw.send_close(None)
    assert await raw.read_close() == (None, "")
    await raw.wait_closed()
    assert await count(http_client, url) == ("There are 0 WebSocket clients connected to this Durable Object instance.")


@pytest.mark.gen_test
async def test_dropped_connection_leaves_the_count(url, http_client, port, runtime):
    raw = await RawClient.connect(port)
    assert await count(http_client, url) == ("There is 1 WebSocket client connected to this Durable Object instance.")
    raw.abort()
    host = runtime.find("WEBSOCKET_HIBERNATION_SERVER", "foo")
    # The server learns of the drop when its read fails; nothing to await but that.
    await until(lambda: not host.sockets)
    assert await count(http_client, url) == ("There are 0 WebSocket clients connected to this Durable Object instance.")


@pytest.mark.gen_test
async def test_the_echo_app_answers_a_dropped_connection_without_an_error(port, runtime, caplog):
    # The default application answers every close with ws.close(code, ...); for a dropped
    # connection the code is 1006, which may not be sent: that is not an error.
    caplog.set_level(logging.ERROR)
    raw = await RawClient.connect(port, "/websocket")
    raw.abort()
    await until(lambda: runtime.find("WEBSOCKET_HIBERNATION_SERVER", "foo").sockets == {})
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert runtime.stats.snapshot().handler_errors.get("web_socket_message", 0) == 0


@pytest.mark.gen_test
async def test_an_open_websocket_keeps_nothing_of_its_upgrade_request(url):
    """What an idle socket costs is what it holds: its upgrade's Request (headers, body) goes
    once the application's fetch() has answered."""
    clients = [await connect(url("/websocket", "ws")) for _ in range(20)]
    try:
        for ws in clients:
            await ws.send("x")
            assert await ws.recv() == "[Durable Object]: x"
        gc.collect()
        assert [o for o in gc.get_objects() if isinstance(o, Request)] == []
    finally:
        for ws in clients:
            await ws.close()
