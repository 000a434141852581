"""Outbound WebSockets (issue 17 item 7, workerd#1439): an object opens a client WebSocket to a
real upstream server (Tornado, started by each test), the runtime holds it while the object
hibernates, and the upstream's messages and Close reach the object through the same handlers."""

import asyncio
import contextlib
import json
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from tests.apps.outbound import Upstream, relay_app
from tests.helpers import constructions
from wsecho.core.lifecycle import ObjectState
from wsecho.core.limits import Limits
from wsecho.core.placement import slot_of
from wsecho.serve.config import Settings
from wsecho.serve.server import Server
from wsecho.testing import serve_app

#: Served by the standalone gateway and by objects mounted in a Tornado application.
SERVINGS = ("standalone", "tornado")


@pytest.fixture
def wsecho_app(recorder):
    return relay_app(recorder)


@pytest.fixture
def upstream(io_loop):
    server = Upstream()
    yield server
    io_loop.run_sync(server.stop, timeout=5)


async def ask(ws, op, **args):
    """Run command ``op`` in the object; its result, or the error as a string."""
    await ws.send(json.dumps({"op": op, **args}))
    async with asyncio.timeout(5):
        answer = json.loads(await ws.recv())
    return answer["ok"] if "ok" in answer else "error: " + answer["error"]


def hibernate(runtime, clock, name):
    host = runtime.find("RELAYS", name)
    assert runtime.sweep(now=clock.monotonic() + 10) == 1
    assert host.lifecycle.state is ObjectState.HIBERNATING
    return host


@pytest.mark.gen_test
async def test_an_upstream_message_wakes_the_hibernated_object_with_its_socket(url, runtime, clock, recorder, upstream):
    async with connect(url("/r/ws", "ws")) as client:
        opened = await ask(client, "connect", url=upstream.url(), tags=["upstream", "feed"], attachment={"n": 1})
        assert opened == [upstream.url(), None, 1]  # url, protocol, ReadyState.OPEN
        assert await ask(client, "send", text="hi") == 1
        (first,) = await recorder.wait_for(lambda r: r.of("upstream"))
        assert first[1:4] == ("echo:hi", ["upstream", "feed"], {"n": 1})
        assert await ask(client, "count", tag="feed") == 1

        hibernate(runtime, clock, "r")
        upstream.peers[0].write_message("news")
        _, second = await recorder.wait_for(lambda r: len(r.of("upstream")) == 2 and r.of("upstream"))
        # a new instance got the upstream's message on the same socket: its tags and attachment
        assert second[1:4] == ("news", ["upstream", "feed"], {"n": 1})
        assert second[4] != first[4]  # another instance
        assert len(constructions(recorder, "r")) == 2
        assert upstream.received == ["hi"]


@pytest.mark.gen_test
async def test_the_upstream_closing_is_web_socket_close_and_the_runtime_answers(
    url, runtime, clock, recorder, upstream
):
    async with connect(url("/c/ws", "ws")) as client:
        await ask(client, "connect", url=upstream.url())
        hibernate(runtime, clock, "c")
        upstream.peers[0].close(4000, "upstream says bye")
        (close,) = await recorder.wait_for(lambda r: r.of("close"))
        assert close[1:] == (["upstream"], 4000, "upstream says bye", True)
        # the runtime answered the Close for the object (with the upstream's code)
        assert (await upstream.wait_for(lambda: upstream.closed))[0][0] == 4000
        assert await ask(client, "count") == 0
        assert runtime.dialer.open == 0


@pytest.mark.gen_test
async def test_the_object_closes_its_upstream_socket(url, recorder, upstream):
    async with connect(url("/o/ws", "ws")) as client:
        await ask(client, "connect", url=upstream.url())
        assert await ask(client, "close", code=4001, reason="done") is None
        assert await upstream.wait_for(lambda: upstream.closed) == [(4001, "done")]
        (close,) = await recorder.wait_for(lambda r: r.of("close"))
        assert close[1:3] == (["upstream"], 4001)  # the upstream's answer ends it


@pytest.mark.gen_test
async def test_a_broadcast_reaches_an_upstream_socket_framed_as_a_client_s(url):
    received = []
    arrived = asyncio.Event()

    async def echo_nothing(ws):
        async for message in ws:
            received.append(message)
            arrived.set()

    # websockets' server enforces RFC 6455 §5.1: a server's unmasked frame fails the connection
    async with serve(echo_nothing, "127.0.0.1", 0) as strict, connect(url("/b/ws", "ws")) as client:
        port = strict.sockets[0].getsockname()[1]
        await ask(client, "connect", url=f"ws://127.0.0.1:{port}/")
        assert await ask(client, "broadcast", text="to all") == 1
        async with asyncio.timeout(5):
            await arrived.wait()
        assert received == ["to all"]
        assert await ask(client, "count") == 1  # still open


@pytest.mark.gen_test
async def test_auto_responses_answer_the_upstream_without_waking(url, runtime, clock, recorder, upstream):
    async with connect(url("/a/ws", "ws")) as client:
        await ask(client, "connect", url=upstream.url())
        await ask(client, "auto", request="ping", response="pong")
        hibernate(runtime, clock, "a")
        upstream.peers[0].write_message("ping")
        assert await upstream.wait_for(lambda: upstream.received) == ["pong"]
        assert len(constructions(recorder, "a")) == 1
        assert runtime.find("RELAYS", "a").lifecycle.state is ObjectState.HIBERNATING


@pytest.mark.gen_test
async def test_protocols_and_headers_are_offered_to_the_upstream(url, upstream):
    async with connect(url("/p/ws", "ws")) as client:
        opened = await ask(client, "connect", url=upstream.url(), protocols=["v2", "v1"], headers={"X-Token": "t1"})
        assert opened[1] == "v2"
        assert upstream.headers[0]["X-Token"] == "t1"


@pytest.mark.gen_test
async def test_a_bad_url_is_a_value_error_naming_it(url, runtime):
    async with connect(url("/u/ws", "ws")) as client:
        assert await ask(client, "connect", url="http://127.0.0.1/x") == (
            "error: InvalidArgumentError: connect_web_socket(): bad url 'http://127.0.0.1/x': "
            "the scheme must be ws or wss"
        )
        assert await ask(client, "connect", url="ws:///x") == (
            "error: InvalidArgumentError: connect_web_socket(): bad url 'ws:///x': it has no host"
        )
        assert (await ask(client, "connect", url="ws://h:99999/")).startswith(
            "error: InvalidArgumentError: connect_web_socket(): bad url 'ws://h:99999/': Port out of range"
        )
        assert runtime.dialer.open == 0


@pytest.mark.gen_test
async def test_a_refused_handshake_raises_with_the_status_and_leaves_nothing(url, runtime, recorder, upstream):
    async with connect(url("/f/ws", "ws")) as client:
        answer = await ask(client, "connect", url=upstream.url("/refuse"))
        assert answer == (
            f"error: OutboundConnectError: connect_web_socket({upstream.url('/refuse')!r}): "
            "the upstream answered 403 Forbidden instead of 101"
        )
        assert await ask(client, "count") == 0
        assert runtime.dialer.open == 0
        assert runtime.stats.outbound_failed == 1
        assert recorder.of("close") == []


@pytest.mark.gen_test
async def test_losing_the_slot_closes_the_upstream_with_1012(url, runtime, upstream):
    async with connect(url("/s/ws", "ws")) as client:
        await ask(client, "connect", url=upstream.url())
        host = runtime.find("RELAYS", "s")
        assert runtime.drop_slots({slot_of(host.id.hex)}, "the lease ran out") == 1
        closed = await upstream.wait_for(lambda: upstream.closed)
        assert closed[0][0] == 1012
        with contextlib.suppress(Exception):
            await client.wait_closed()


@pytest.mark.gen_test
async def test_a_lost_upstream_is_web_socket_close_1006(url, recorder, upstream):
    async with connect(url("/l/ws", "ws")) as client:
        await ask(client, "connect", url=upstream.url())
        upstream.peers[0].ws_connection.stream.close()  # TCP gone, no Close frame
        (close,) = await recorder.wait_for(lambda r: r.of("close"))
        assert close[1:] == (["upstream"], 1006, "", False)
        assert await ask(client, "count") == 0


@pytest.mark.gen_test
async def test_an_upstream_breaking_the_protocol_is_web_socket_error(url, recorder, upstream):
    async with connect(url("/e/ws", "ws")) as client:
        await ask(client, "connect", url=upstream.url())
        upstream.peers[0].ws_connection.stream.write(b"\x81\x01\xff")  # a text frame that is not UTF-8
        (error,) = await recorder.wait_for(lambda r: r.of("error"))
        assert error[1] == ["upstream"]
        assert "1007" in error[2]
        assert (await upstream.wait_for(lambda: upstream.closed))[0][0] == 1007


@pytest.mark.gen_test
async def test_an_upstream_that_never_answers_times_out_and_leaves_nothing(url, runtime):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP (the backlog), never answers
    try:
        runtime.dialer.connect_timeout = 0.2
        target = f"ws://127.0.0.1:{silent.getsockname()[1]}/"
        async with connect(url("/t/ws", "ws")) as client:
            assert await ask(client, "connect", url=target) == (
                f"error: OutboundConnectError: connect_web_socket({target!r}): no answer within 0.2 s "
                "(--outbound-connect-timeout)"
            )
            assert await ask(client, "count") == 0
        assert runtime.dialer.open == 0
    finally:
        silent.close()


# -- limits, options and TLS -------------------------------------------------


@pytest.mark.gen_test
async def test_outbound_sockets_are_bounded_per_object_and_per_process(recorder, upstream):
    async with serve_app(relay_app(recorder), limits=Limits(outbound_per_object=2, outbound_sockets=3)) as t:
        one = await t.connect("/one/ws")
        assert (await ask(one, "connect", url=upstream.url()))[2] == 1
        assert (await ask(one, "connect", url=upstream.url()))[2] == 1
        assert await ask(one, "connect", url=upstream.url()) == (
            "error: InvalidStateError: connect_web_socket(): this object already has 2 outbound WebSockets; "
            "the limit is 2 (--max-outbound-per-object)"
        )
        two = await t.connect("/two/ws")
        assert (await ask(two, "connect", url=upstream.url()))[2] == 1
        assert await ask(two, "connect", url=upstream.url()) == (
            "error: InvalidStateError: connect_web_socket(): this process already has 3 outbound WebSockets; "
            "the limit is 3 (--max-outbound)"
        )
        assert await ask(one, "count") == 2
        assert await ask(two, "count") == 1


def test_the_outbound_options_reach_the_dialer(tmp_path):
    settings = Settings(data_dir=":memory:", outbound_ca_file="ca.pem", outbound_connect_timeout=3.5)
    dialer = Server(relay_app(None), settings).runtime.dialer
    assert (dialer.ca_file, dialer.connect_timeout) == ("ca.pem", 3.5)


@pytest.mark.gen_test
async def test_a_wss_upstream_is_checked_against_the_ca_file(recorder, test_ca):
    upstream = Upstream(ssl_options=test_ca.server)
    try:
        async with serve_app(relay_app(recorder)) as t:
            client = await t.connect("/tls/ws")
            # the system's CAs (the default) do not know the test's CA
            answer = await ask(client, "connect", url=upstream.url(scheme="wss"))
            assert answer.startswith("error: OutboundConnectError: ")
            assert "CERTIFICATE_VERIFY_FAILED" in answer
            t.runtime.dialer.ca_file = test_ca.path  # what --outbound-ca-file sets
            opened = await ask(client, "connect", url=upstream.url(scheme="wss"))
            assert opened[2] == 1
            await ask(client, "send", text="secret")
            (got,) = await recorder.wait_for(lambda r: r.of("upstream"))
            assert got[1] == "echo:secret"
    finally:
        await upstream.stop()
