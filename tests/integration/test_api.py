"""SPEC §2-§5 through a real client: tags, attachments, auto-response, timeouts, control, RPC, ids."""

import asyncio
import json
from urllib.parse import quote

import pytest
from tornado.httpclient import HTTPRequest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.apps.lab import lab_app
from tests.helpers import FakeTransport, constructions, until
from wsecho import (
    InvalidArgumentError,
    InvalidStateError,
    Limits,
    WebSocketPair,
    WebSocketRequestResponsePair,
    WsechoError,
)
from wsecho.api.websocket import link_of
from wsecho.core.lifecycle import ObjectState
from wsecho.runtime.host import PIN_NON_HIBERNATABLE, PIN_WAIT_UNTIL
from wsecho.runtime.runtime import Runtime

#: Served by the standalone gateway, by objects mounted in a Tornado application, and over TLS.
SERVINGS = ("standalone", "tornado", "tls")


@pytest.fixture
def flags():
    return {}


@pytest.fixture
def wsecho_app(recorder, flags):
    return lab_app(recorder, flags)


async def ask(ws, op, **args):
    await ws.send(json.dumps({"op": op, **args}))
    return json.loads(await ws.recv())


async def status_of(http_client, url):
    response = await http_client.fetch(HTTPRequest(url), raise_error=False)
    return response.code


# -- tags -----------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_tags_are_deduplicated_in_order_and_survive_hibernation(url, runtime, clock, http_client):
    async with (
        connect(url("/lab/t/ws?tags=red,blue,red", "ws")) as ws,
        connect(url("/lab/t/ws?tags=blue", "ws")),
    ):
        assert await ask(ws, "tags") == {"ok": ["red", "blue"]}
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        assert await ask(ws, "tags") == {"ok": ["red", "blue"]}
        assert await ask(ws, "tagged", tag="blue") == {"ok": 2}
        assert await ask(ws, "tagged", tag="red") == {"ok": 1}
        assert await ask(ws, "tagged", tag="green") == {"ok": 0}
        count = await http_client.fetch(url("/lab/t/count?tag=blue"))
        assert count.body == b"2"


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (",".join(f"t{i}" for i in range(11)), "11 distinct tags; the limit is 10"),
        ("é" * 129, "is 258 UTF-8 bytes; the limit is 256"),
    ],
    ids=["eleven", "too-long"],
)
@pytest.mark.gen_test
async def test_bad_tags_refuse_the_handshake_and_leave_nothing(url, http_client, runtime, tags, message, caplog):
    assert await status_of(http_client, url(f"/lab/bad/ws?tags={quote(tags)}")) == 500
    assert any(message in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert runtime.find("LAB", "bad").sockets == {}


@pytest.mark.gen_test
async def test_ten_tags_of_256_bytes_are_fine(url):
    tags = ",".join(("é" * 127) + f"{i:02d}" for i in range(10))
    async with connect(url(f"/lab/ok/ws?tags={quote(tags)}", "ws")) as ws:
        assert len((await ask(ws, "tags"))["ok"]) == 10


def test_tag_validation_unit(runtime):
    from wsecho.api.objects import _validate_tags

    limits = Limits()
    assert _validate_tags(["a", "b", "a", "c", "b"], limits) == ("a", "b", "c")
    with pytest.raises(InvalidArgumentError, match="every tag must be a str"):
        _validate_tags(["a", 3], limits)
    with pytest.raises(InvalidArgumentError, match="not the str"):
        _validate_tags("abc", limits)


@pytest.mark.gen_test
async def test_get_tags_of_a_socket_that_is_not_ours_raises(url, runtime):
    async with connect(url("/lab/x/ws", "ws")):
        host = runtime.find("LAB", "x")
        from wsecho.api.objects import DurableObjectState

        ctx = DurableObjectState(host)
        stranger = WebSocketPair()[1]
        with pytest.raises(InvalidStateError, match="not a hibernatable socket of this object"):
            ctx.get_tags(stranger)


# -- attachments ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_attachment_round_trip_copy_and_hibernation(url, runtime, clock, recorder):
    async with connect(url("/lab/a/ws", "ws")) as ws:
        assert await ask(ws, "get") == {"ok": None}
        value = {"name": "ann", "seen": [1, 2.5, True, None], "nested": {"k": "é"}}
        assert await ask(ws, "set", value=value) == {"ok": None}
        assert await ask(ws, "get") == {"ok": value}
        assert await ask(ws, "mutate") == {"ok": {"list": [1]}}
        await ask(ws, "set", value=value)
        runtime.sweep(now=clock.monotonic() + 10)
        # readable in the constructor after the wake ...
        assert await ask(ws, "get") == {"ok": value}
        assert constructions(recorder, "a")[-1] == ("constructor", "a", [value])
    # ... and in web_socket_close
    await recorder.wait_for(lambda r: r.of("close"))
    assert recorder.of("close")[0][4] == value


@pytest.mark.gen_test
async def test_oversized_attachment_raises_and_keeps_the_previous(url):
    async with connect(url("/lab/a/ws", "ws")) as ws:
        # 16,384 bytes encoded: the JSON string's two quotes plus 16,382 characters
        assert await ask(ws, "set_huge", size=16_382) == {"ok": None}
        answer = await ask(ws, "set_huge", size=16_383)
        assert answer == {
            "error": "InvalidArgumentError: serialize_attachment(): the value is 16385 bytes encoded; the limit is 16384"
        }
        assert len((await ask(ws, "get"))["ok"]) == 16_382


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("set", "set at the top level is not JSON-compatible"),
        ("bytes", "bytes at the top level is not JSON-compatible"),
        ("nan", "nan at the top level is not JSON"),
        ("key", "dict keys must be str, got 1"),
    ],
)
@pytest.mark.gen_test
async def test_non_json_attachments_are_refused(url, kind, message):
    async with connect(url("/lab/a/ws", "ws")) as ws:
        await ask(ws, "set", value=[1])
        answer = await ask(ws, "set_bad", kind=kind)
        assert answer["error"].startswith("InvalidArgumentError")
        assert message in answer["error"]
        assert await ask(ws, "get") == {"ok": [1]}


# -- auto-response ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_auto_response_answers_without_waking(url, runtime, clock, recorder, flags):
    flags["auto_response"] = True
    async with connect(url("/lab/p/ws", "ws")) as ws:
        assert await ask(ws, "auto") == {"ok": [["ping", "pong"], None]}
        host = runtime.find("LAB", "p")
        runtime.sweep(now=clock.monotonic() + 10)
        assert host.lifecycle.state is ObjectState.HIBERNATING
        await ws.send("ping")
        assert await ws.recv() == "pong"
        assert host.lifecycle.state is ObjectState.HIBERNATING
        assert len(constructions(recorder, "p")) == 1
        assert recorder.of("message") == []
        # not an exact whole-text match: delivered as usual
        await ws.send("ping ")
        assert await ws.recv() == "echo:ping "
        await ws.send(b"ping")
        assert await ws.recv() == b"binary:ping"
        # the per-socket timestamp survived the hibernation
        assert await ask(ws, "auto") == {"ok": [["ping", "pong"], "2026-01-02T03:04:05+00:00"]}
        assert runtime.stats.auto_responses == 1


@pytest.mark.gen_test
async def test_auto_response_can_be_replaced_and_cleared(url):
    async with connect(url("/lab/p/ws", "ws")) as ws:
        assert await ask(ws, "set_auto", request="hb", response="ack") == {"ok": None}
        await ws.send("hb")
        assert await ws.recv() == "ack"
        assert await ask(ws, "clear_auto") == {"ok": None}
        await ws.send("hb")
        assert await ws.recv() == "echo:hb"


@pytest.mark.gen_test
async def test_auto_response_limits(url):
    async with connect(url("/lab/p/ws", "ws")) as ws:
        assert await ask(ws, "set_auto", request="é" * 1024, response="x") == {"ok": None}
        answer = await ask(ws, "set_auto", request="x", response="y" * 2049)
        assert answer == {
            "error": "InvalidArgumentError: set_web_socket_auto_response(): the response is 2049 UTF-8 bytes; "
            "the limit is 2048"
        }
    with pytest.raises(InvalidArgumentError):
        WebSocketRequestResponsePair("a", 5)


@pytest.mark.gen_test
async def test_no_auto_response_on_a_socket_the_server_closed(port, flags, runtime):
    from tests.helpers import RawClient

    flags["auto_response"] = True
    raw = await RawClient.connect(port, "/lab/p/ws")
    raw.send_frame(0x1, json.dumps({"op": "close", "code": 4000, "reason": "done"}).encode())
    assert await raw.read_close() == (4000, "done")
    raw.send_frame(0x1, b"ping")
    raw.send_close(1000)
    # the next frame after the Close would be the pong; the connection ends instead
    assert await raw.read_frame() == (-1, b"")
    raw.abort()
    assert runtime.stats.auto_responses == 0


# -- event timeout ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_event_timeout_settings_are_validated(url):
    async with connect(url("/lab/e/ws", "ws")) as ws:
        assert await ask(ws, "get_timeout") == {"ok": None}
        assert await ask(ws, "timeout", ms=1500) == {"ok": None}
        assert await ask(ws, "get_timeout") == {"ok": 1500}
        for bad in (0, -1, 604_800_001, "10", 1.5):
            answer = await ask(ws, "timeout", ms=bad)
            assert "from 1 to 604800000" in answer["error"]
        assert await ask(ws, "timeout", ms=None) == {"ok": None}
        assert await ask(ws, "get_timeout") == {"ok": None}


@pytest.mark.gen_test
async def test_a_handler_over_the_event_timeout_resets_the_object(url, runtime, recorder, flags):
    flags["event_timeout"] = 30
    async with connect(url("/lab/e/ws", "ws")) as a, connect(url("/lab/e/ws", "ws")) as b:
        await a.send(json.dumps({"op": "hang"}))
        with pytest.raises(Exception):  # noqa: B017, PT011 - the client's ConnectionClosed
            await asyncio.wait_for(a.recv(), 5)
        assert a.close_code == 1011
        await b.wait_closed()
        assert b.close_code == 1011
    assert runtime.stats.snapshot().event_timeouts == 1
    assert runtime.stats.snapshot().resets == 1
    # the peers' answers to the 1011 Close were delivered to a fresh instance
    await recorder.wait_for(lambda r: len(r.of("close")) == 2)
    assert len(constructions(recorder, "e")) == 2


@pytest.mark.parametrize("suspend_first", [False, True])
@pytest.mark.gen_test
async def test_nothing_a_turn_over_the_event_timeout_sent_is_delivered(url, runtime, clock, flags, suspend_first):
    # Red team L9: a handler that does not await cannot be interrupted; when it returns
    # over the timeout, what it sent must not reach anyone (it did, before the 1011), also
    # when it had suspended once and then ran on in its task (that was not checked at all).
    flags.update(clock=clock)
    async with connect(url("/lab/bt/ws", "ws")) as ws:
        assert await ask(ws, "timeout", ms=100) == {"ok": None}
        await ws.send(json.dumps({"op": "busy", "seconds": 0.05, "suspend_first": suspend_first}))
        assert await ws.recv() == "partial output"  # within the timeout: delivered at the end of the turn
        assert json.loads(await ws.recv()) == {"ok": "done"}
        await ws.send(json.dumps({"op": "busy", "seconds": 0.5, "suspend_first": suspend_first}))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)  # the Close is the first thing to arrive
        assert ws.close_code == 1011
    assert runtime.stats.snapshot().event_timeouts == 1


# -- block_concurrency_while, wait_until, abort ----------------------------------------


@pytest.mark.gen_test
async def test_block_concurrency_while_in_the_constructor_holds_events(url, runtime, recorder, flags):
    gate = asyncio.get_running_loop().create_future()
    flags.update(block=True, gate=gate)
    stub = runtime.env.LAB.get_by_name("b")
    first = asyncio.ensure_future(stub.fetch("http://x/lab/b/count"))
    await until(lambda: runtime.find("LAB", "b") is not None)
    host = runtime.find("LAB", "b")
    assert host.lifecycle.state is ObjectState.WAKING
    second = asyncio.ensure_future(stub.add(1, 2))
    await asyncio.sleep(0)
    assert recorder.of("rpc") == []
    gate.set_result(None)
    assert (await first).body == b"0"
    assert await second == 3
    assert recorder.events.index(("loaded",)) < recorder.events.index(("rpc", "add", 1, 2))
    assert len(constructions(recorder, "b")) == 1


@pytest.mark.gen_test
async def test_block_concurrency_while_failing_in_the_constructor_closes_1011(url, runtime, flags):
    gate = asyncio.get_running_loop().create_future()
    gate.set_result(None)
    flags.update(block=True, gate=gate)
    async with connect(url("/lab/bf/ws", "ws")) as ws:
        runtime.sweep(now=runtime.clock() + 10)
        flags["block_raises"] = True
        await ws.send("wake")
        await ws.wait_closed()
        assert ws.close_code == 1011
    assert runtime.stats.constructor_errors >= 1


@pytest.mark.gen_test
async def test_block_concurrency_while_in_a_handler_returns_the_value(url):
    async with connect(url("/lab/b2/ws", "ws")) as ws:
        assert await ask(ws, "block") == {"ok": 42}


@pytest.mark.gen_test
async def test_wait_until_keeps_the_object_awake(url, runtime, clock, flags):
    gate = asyncio.get_running_loop().create_future()
    flags["gate"] = gate
    async with connect(url("/lab/w/ws", "ws")) as ws:
        assert await ask(ws, "wait_until") == {"ok": None}
        host = runtime.find("LAB", "w")
        assert host.lifecycle.hibernation_blocker() == PIN_WAIT_UNTIL
        assert runtime.sweep(now=clock.monotonic() + 100) == 0
        gate.set_result(None)
        await until(lambda: host.lifecycle.hibernation_blocker() is None)
        assert runtime.sweep(now=clock.monotonic() + 10) == 1


@pytest.mark.gen_test
async def test_abort_closes_every_socket_1011_and_drops_the_instance(url, runtime, recorder):
    async with connect(url("/lab/ab/ws", "ws")) as a, connect(url("/lab/ab/ws", "ws")) as b:
        await a.send(json.dumps({"op": "abort"}))
        await a.wait_closed()
        await b.wait_closed()
        assert (a.close_code, b.close_code) == (1011, 1011)
    assert runtime.stats.snapshot().resets == 1
    async with connect(url("/lab/ab/ws", "ws")) as c:
        assert await ask(c, "count") == {"ok": 1}
    assert len(constructions(recorder, "ab")) == 2


@pytest.mark.gen_test
async def test_abort_in_the_constructor_fails_the_wake(url, http_client, runtime, flags):
    flags["abort_in_constructor"] = True
    assert await status_of(http_client, url("/lab/ac/count")) == 500
    assert runtime.stats.constructor_errors == 1


# -- non-hibernatable sockets ------------------------------------------------------------


@pytest.mark.gen_test
async def test_accept_makes_a_socket_that_pins_its_object(url, runtime, clock, recorder):
    async with connect(url("/lab/n/ws?mode=accept", "ws")) as ws:
        await ws.send("hello")
        assert await ws.recv() == "echo:hello"
        host = runtime.find("LAB", "n")
        assert host.lifecycle.hibernation_blocker() == PIN_NON_HIBERNATABLE
        assert runtime.sweep(now=clock.monotonic() + 100) == 0
        assert await ask(ws, "count") == {"ok": 0}  # get_web_sockets() lists hibernatable ones
        assert await ask(ws, "tags") == {
            "error": ("InvalidStateError: get_tags(): the WebSocket is not a hibernatable socket of this object")
        }
    await recorder.wait_for(lambda r: r.of("close"))
    assert runtime.sweep(now=clock.monotonic() + 10) == 1


@pytest.mark.gen_test
async def test_accept_in_a_worker_refuses_the_upgrade(url, http_client, caplog):
    assert await status_of(http_client, url("/worker-accept")) == 500
    assert any(
        "must be called in a Durable Object's handler" in str(r.exc_info[1]) for r in caplog.records if r.exc_info
    )


# -- RPC ---------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_rpc_calls_run_in_the_objects_turn(runtime, recorder):
    stub = runtime.env.LAB.get_by_name("r")
    assert await stub.add(2, 3) == 5
    assert await stub.describe(who="you") == "r says hi to you"
    with pytest.raises(KeyError, match="nope"):
        await stub.fail()
    for missing in ("nothing_here", "web_socket_message", "fetch_not", "alarm"):
        with pytest.raises(InvalidArgumentError, match="has no RPC method"):
            await getattr(stub, missing)()
    with pytest.raises(AttributeError):
        stub._private  # noqa: B018
    assert len(constructions(recorder, "r")) == 1


@pytest.mark.gen_test
async def test_calling_your_own_stub_from_a_handler_is_refused(url):
    async with connect(url("/lab/self/ws", "ws")) as ws:
        answer = await ask(ws, "self_call")
        assert answer["error"].startswith("InvalidStateError")
        assert "would wait for the handler itself" in answer["error"]


# -- ids -----------------------------------------------------------------------------------


def test_ids(runtime):
    ns = runtime.env.LAB
    named = ns.id_from_name("room")
    assert named == ns.id_from_name("room")
    assert named.name == "room"
    assert len(str(named)) == 64
    unique = ns.new_unique_id()
    assert unique != ns.new_unique_id()
    assert unique.name is None
    parsed = ns.id_from_string(str(named))
    assert parsed == named
    for bad in ("", "xyz", str(named).upper(), str(named)[:-1], 42):
        with pytest.raises(InvalidArgumentError, match="64 lowercase hex digits"):
            ns.id_from_string(bad)
    with pytest.raises(ValueError, match=r"takes an id made by env\.LAB"):
        ns.get("not an id")


def test_ids_differ_between_namespaces(recorder):
    from tests.apps.lab import Lab, lab_worker
    from wsecho import App

    app = App(fetch=lab_worker, bindings={"LAB": Lab, "OTHER": Lab}, vars={"REC": recorder, "FLAGS": {}})
    rt = Runtime(app, clock=lambda: 0.0, wall_clock=lambda: None)
    assert rt.env.LAB.id_from_name("x") != rt.env.OTHER.id_from_name("x")
    with pytest.raises(InvalidArgumentError):
        rt.env.OTHER.get(rt.env.LAB.id_from_name("x"))


# -- limits, close and send validation, errors ---------------------------------------------


@pytest.mark.gen_test
async def test_the_socket_limit_refuses_one_more(url, http_client, runtime, caplog):
    runtime.limits = Limits(sockets_per_object=2)
    async with connect(url("/lab/full/ws", "ws")), connect(url("/lab/full/ws", "ws")):
        assert await status_of(http_client, url("/lab/full/ws")) == 500
        assert any(
            "already has 2 hibernatable WebSockets; the limit is 2" in str(r.exc_info[1])
            for r in caplog.records
            if r.exc_info
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"code": 1005}, "code 1005 may not be sent"),
        ({"code": 999}, "code 999 may not be sent"),
        ({"code": 5000}, "code 5000 may not be sent"),
        ({"code": 1000, "reason": "é" * 62}, "the reason is 124 UTF-8 bytes; the limit is 123"),
        ({"code": None, "reason": "why"}, "a reason needs a code"),
        ({"code": 1000.0}, "the code must be an integer"),
    ],
)
@pytest.mark.gen_test
async def test_close_arguments_are_validated(url, args, message):
    async with connect(url("/lab/c/ws", "ws")) as ws:
        answer = await ask(ws, "close", **args)
        assert answer["error"].startswith("InvalidArgumentError")
        assert message in answer["error"]
        assert await ask(ws, "ready_state") == {"ok": 1}


def accepted_socket(runtime):
    from wsecho.api.objects import DurableObjectState

    ns = runtime.namespaces["LAB"]
    host = runtime.host(ns.id_from_name("unit"), ns.object_class)
    _client, server = WebSocketPair()
    DurableObjectState(host).accept_web_socket(server)
    return server


def test_ready_state_second_close_and_send_after_close(runtime):
    from wsecho import ReadyState

    ws = accepted_socket(runtime)
    transport = FakeTransport()
    assert ws.ready_state is ReadyState.CONNECTING
    ws.send("early")
    runtime.socket_opened(link_of(ws), transport, "ws://x/", None, "")
    assert ws.ready_state is ReadyState.OPEN
    assert transport.frames == [("message", "early")]
    ws.close(1000, "é" * 61)
    assert ws.ready_state is ReadyState.CLOSING
    ws.close(4000, "again")  # ignored
    assert transport.frames[1:] == [("close", 1000, "é" * 61)]
    with pytest.raises(InvalidStateError, match=r"send\(\) after close\(\)"):
        ws.send("late")
    runtime.peer_closed(link_of(ws), 1000, "")
    assert ws.ready_state is ReadyState.CLOSED
    with pytest.raises(InvalidStateError):
        ws.send("later")


def test_close_before_the_handshake_goes_out_after_it(runtime):
    ws = accepted_socket(runtime)
    ws.send("first")
    ws.close(4001, "not now")
    transport = FakeTransport()
    runtime.socket_opened(link_of(ws), transport, "ws://x/", None, "")
    assert transport.frames == [("message", "first"), ("close", 4001, "not now")]


def test_client_end_of_a_pair_cannot_send(runtime):
    client, _server = WebSocketPair()
    with pytest.raises(InvalidStateError, match="no object accepted"):
        client.send("x")
    with pytest.raises(InvalidStateError, match="no object accepted"):
        client.close()


@pytest.mark.gen_test
async def test_send_takes_str_or_bytes(url):
    async with connect(url("/lab/s/ws", "ws")) as ws:
        assert await ask(ws, "send", value=5) == {"error": "InvalidArgumentError: send() takes str or bytes, not int"}
        # red team L6: a lone surrogate cannot be sent as UTF-8; it is a clear error at the call
        assert await ask(ws, "send", value="a\ud800") == {
            "error": "InvalidArgumentError: send(): the message contains a lone surrogate (\\ud800 at index 1), "
            "which UTF-8 cannot encode"
        }
        assert (await ask(ws, "close", code=4000, reason="\udc00"))["error"].startswith(
            "InvalidArgumentError: close(): the reason contains a lone surrogate"
        )


def test_error_hierarchy():
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidArgumentError, WsechoError)
    assert issubclass(InvalidStateError, RuntimeError)
    assert issubclass(InvalidStateError, WsechoError)
    import wsecho.core.errors

    for name in dir(wsecho.core.errors):
        obj = getattr(wsecho.core.errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == "wsecho.core.errors":
            assert issubclass(obj, WsechoError), name


@pytest.mark.gen_test
async def test_block_concurrency_while_outside_a_turn_takes_a_turn(runtime, recorder):
    # Called from a background task (not a handler): fn runs as a turn of its own,
    # so an RPC call that arrives meanwhile waits for it.
    from wsecho.api.objects import DurableObjectState

    stub = runtime.env.LAB.get_by_name("bg")
    assert await stub.add(0, 0) == 0
    host = runtime.find("LAB", "bg")
    ctx = DurableObjectState(host)
    gate = asyncio.get_running_loop().create_future()
    order = []

    async def critical():
        order.append("critical start")
        await gate
        order.append("critical end")
        return "done"

    blocked = ctx.block_concurrency_while(critical)
    call = asyncio.ensure_future(stub.add(1, 1))
    await until(lambda: order == ["critical start"])
    assert host.lifecycle.hibernation_blocker() == "an event is being handled"
    assert not call.done()
    gate.set_result(None)
    assert await blocked == "done"
    assert await call == 2
    assert order == ["critical start", "critical end"]
