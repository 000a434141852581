"""SPEC §5 closing rules: exactly one final event per socket, with the right code and cleanliness."""

import logging

import pytest
from websockets.asyncio.client import connect

from tests.conftest import MAX_MESSAGE
from tests.helpers import RawClient, probe_app
from wsecho.core.lifecycle import ObjectState

#: Served by the standalone gateway, by objects mounted in a Tornado application, and over TLS.
SERVINGS = ("standalone", "tornado", "tls")


@pytest.fixture
def wsecho_app(recorder):
    return probe_app(recorder)


def finals(recorder):
    return [e for e in recorder.events if e[0] in ("close", "error")]


async def one_final(recorder):
    await recorder.wait_for(finals)
    return finals(recorder)


@pytest.mark.gen_test
async def test_peer_close_is_delivered_once_and_answered_by_the_runtime(port, recorder, runtime):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_close(4321, b"leaving")
    # The Probe does not call close(): the runtime answers with the same code.
    assert await raw.read_close() == (4321, "")
    await raw.wait_closed()
    # the closing socket still counted while its close event ran
    assert await one_final(recorder) == [("close", 4321, "leaving", True, 1)]
    assert runtime.find("PROBE", "c").sockets == {}


@pytest.mark.gen_test
async def test_the_handler_answer_is_the_close_the_peer_gets(port, recorder, runtime):
    runtime.app.vars["FLAGS"]["close_reply"] = True
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_close(1000, b"")
    assert await raw.read_close() == (1000, "probe closing")
    await raw.wait_closed()
    assert await one_final(recorder) == [("close", 1000, "", True, 1)]


@pytest.mark.gen_test
async def test_close_without_status_is_1005(port, recorder):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_close(None)
    assert await raw.read_close() == (None, "")
    await raw.wait_closed()
    assert await one_final(recorder) == [("close", 1005, "", True, 1)]


@pytest.mark.gen_test
async def test_dropped_connection_is_1006_not_clean(port, recorder):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.abort()
    assert await one_final(recorder) == [("close", 1006, "", False, 1)]


@pytest.mark.gen_test
async def test_server_close_then_peer_reply_is_clean(port, recorder, runtime, clock):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_frame(0x1, b"close-then-send")
    assert await raw.read_close() == (4001, "closing")
    await recorder.wait_for(lambda r: r.of("send-raised"))
    assert "send() after close()" in recorder.of("send-raised")[0][1]
    # still CLOSING: the object may hibernate, and the socket remembers it was closed
    assert runtime.sweep(now=clock.monotonic() + 10) == 1
    raw.send_frame(0x1, b"send-after-close")
    await recorder.wait_for(lambda r: len(r.of("send-raised")) == 2)
    assert len(recorder.of("constructor")) == 2
    raw.send_close(1000, b"ok")
    await raw.wait_closed()
    assert await one_final(recorder) == [("close", 1000, "ok", True, 1)]


@pytest.mark.gen_test
async def test_server_close_then_drop_is_1006(port, recorder):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_frame(0x1, b"close-me")
    assert await raw.read_close() == (4000, "bye")
    raw.abort()
    assert await one_final(recorder) == [("close", 1006, "", False, 1)]


@pytest.mark.standalone_only("Tornado's framing aborts the connection right after its Close 1009")
@pytest.mark.gen_test
async def test_oversized_message_closes_1009_and_reports_an_error(port, recorder):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_frame(0x2, b"x" * (MAX_MESSAGE + 1))
    assert (await raw.read_close())[0] == 1009
    await raw.wait_closed()
    assert await one_final(recorder) == [("error", 1009, f"message of more than {MAX_MESSAGE} bytes")]


@pytest.mark.gen_test
async def test_message_at_the_limit_is_accepted(url):
    async with connect(url("/obj/c/ws", "ws"), max_size=None) as ws:
        await ws.send(b"x" * MAX_MESSAGE)
        assert await ws.recv() == b"echo:" + b"x" * MAX_MESSAGE


@pytest.mark.standalone_only("after its Close 1007, Tornado waits 5 s for the peer's Close instead of FIN and drain")
@pytest.mark.gen_test
async def test_invalid_utf8_closes_1007_and_reports_an_error(port, recorder):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_frame(0x1, b"\xff\xfe")
    assert (await raw.read_close())[0] == 1007
    await raw.wait_closed()
    assert await one_final(recorder) == [("error", 1007, "invalid UTF-8 in a text message")]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
@pytest.mark.gen_test
async def test_invalid_peer_close_code_is_answered_with_1002(port, recorder, code):
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_close(code)
    assert (await raw.read_close())[0] == 1002
    await raw.wait_closed()
    assert await one_final(recorder) == [("error", 1002, f"invalid close code {code}")]


@pytest.mark.gen_test
async def test_a_raising_handler_is_logged_and_the_socket_stays_open(url, recorder, caplog, runtime):
    caplog.set_level(logging.ERROR, logger="wsecho")
    async with connect(url("/obj/r/ws", "ws")) as ws:
        await ws.send("raise")
        await ws.send("still alive?")
        assert await ws.recv() == "echo:still alive?"
    errors = [r for r in caplog.records if "web_socket_message raised" in r.getMessage()]
    assert len(errors) == 1
    assert "handler failed on purpose" in str(errors[0].exc_info[1])
    assert runtime.stats.snapshot().handler_errors.get("web_socket_message", 0) == 1


@pytest.mark.gen_test
async def test_constructor_that_raises_closes_sockets_1011(port, recorder, runtime, clock, caplog):
    caplog.set_level(logging.ERROR, logger="wsecho")
    raw = await RawClient.connect(port, "/obj/k/ws")
    runtime.sweep(now=clock.monotonic() + 10)
    runtime.app.vars["FLAGS"]["constructor_raises"] = True
    raw.send_frame(0x1, b"wake up")
    assert (await raw.read_close())[0] == 1011
    host = runtime.find("PROBE", "k")
    assert host.lifecycle.state is ObjectState.HIBERNATING
    assert recorder.of("message") == []
    assert runtime.stats.dropped_events >= 1
    raw.abort()


@pytest.mark.mounted_only
@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        ((0x2, b"x" * (MAX_MESSAGE + 1)), 1009, "message too big"),
        ((0x1, b"\xff\xfe"), 1007, "invalid UTF-8 in a text message"),
    ],
)
@pytest.mark.gen_test
async def test_a_failed_connection_of_a_mounted_object_reports_its_code(port, recorder, frame, code, reason):
    # The wire differs (Tornado's framing), the object's view does not: web_socket_error(code).
    raw = await RawClient.connect(port, "/obj/c/ws")
    raw.send_frame(*frame)
    if code == 1007:  # Tornado waits for the peer's Close (5 s) before it closes TCP
        assert (await raw.read_close())[0] == 1007
        raw.send_close(1007)
    assert await one_final(recorder) == [("error", code, reason)]
    raw.abort()
