"""What wsecho gives beyond Cloudflare's hibernation API, with real clients: tags that change
(workerd#3160), several and binary auto-responses (workerd#6062), idle control from a handler,
and counting sockets without building them; each also across a hibernation."""

import asyncio
import contextlib
import datetime
import json

import pytest
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect

from tests.apps.beyond import beyond_app
from tests.helpers import until
from wsecho.core.lifecycle import ObjectState
from wsecho.serve.config import Settings
from wsecho.serve.server import Server

#: Served by the standalone gateway and by objects mounted in a Tornado application.
SERVINGS = ("standalone", "tornado")


@pytest.fixture
def flags():
    return {}


@pytest.fixture
def wsecho_app(recorder, flags):
    return beyond_app(recorder, flags)


async def ask(ws, op, **args):
    """Run command ``op`` in the object; its result, or the error as a string."""
    await ws.send(json.dumps({"op": op, **args}))
    async with asyncio.timeout(5):
        answer = json.loads(await ws.recv())
    return answer["ok"] if "ok" in answer else "error: " + answer["error"]


async def receive(ws, n=1):
    async with asyncio.timeout(5):
        return [await ws.recv() for _ in range(n)]


@contextlib.asynccontextmanager
async def joined(url, room, *tag_lists):
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(connect(url(f"/{room}/ws?tags={','.join(tags)}", "ws")))
            for tags in tag_lists
        ]


def hibernate(runtime, clock, room):
    host = runtime.find("ROOMS", room)
    assert runtime.sweep(now=clock.monotonic() + 10) == 1
    assert host.lifecycle.state is ObjectState.HIBERNATING
    return host


# -- 3. mutable tags ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_tags_change_and_the_index_follows_across_hibernation(url, runtime, clock, recorder):
    async with joined(url, "t", ["lobby"], ["lobby", "red"]) as (ann, bob):
        assert await ask(ann, "set_tags", tags=["red", "admin", "red"]) is None
        assert await ask(ann, "tags") == ["red", "admin"]
        assert await ask(ann, "members", tag="lobby") == [["lobby", "red"]]
        # the index keeps a socket's place in a tag it kept: bob joined red first
        assert await ask(ann, "members", tag="red") == [["lobby", "red"], ["red", "admin"]]
        hibernate(runtime, clock, "t")
        assert await ask(bob, "remove_tag", tag="lobby") is True
        assert await ask(bob, "remove_tag", tag="lobby") is False
        assert await ask(bob, "add_tag", tag="blue") is None
        assert await ask(bob, "add_tag", tag="blue") is None  # already there: nothing changes
        assert len(recorder.of("constructor")) == 2
        hibernate(runtime, clock, "t")
        # a new instance sees the tags as they were changed, in the index too
        assert await ask(ann, "tags") == ["red", "admin"]
        assert await ask(ann, "members", tag="blue") == [["red", "blue"]]
        assert await ask(ann, "members", tag="lobby") == []
        # the broadcast goes out before the command's answer
        await ann.send(json.dumps({"op": "broadcast", "text": "to admins", "tag": "admin"}))
        assert await receive(ann, 2) == ["to admins", json.dumps({"ok": 1})]
        await bob.send(json.dumps({"op": "broadcast", "text": "to red", "tag": "red"}))
        assert await receive(bob, 2) == ["to red", json.dumps({"ok": 2})]
        assert await receive(ann) == ["to red"]
        assert sorted(runtime.find("ROOMS", "t").tagged) == ["admin", "blue", "red"]


@pytest.mark.gen_test
async def test_a_closed_socket_leaves_every_tag_it_was_given(url, runtime, recorder):
    async with joined(url, "c", ["a"], []) as (ann, bob):
        await ask(bob, "set_tags", tags=["b", "c"])
        assert await ask(ann, "members", tag="b") == [["b", "c"]]
        await bob.close()
        await recorder.wait_for(lambda r: r.of("close"))
        assert await ask(ann, "members", tag="b") == []
        assert sorted(runtime.find("ROOMS", "c").tagged) == ["a"]


@pytest.mark.gen_test
async def test_changing_tags_has_the_limits_of_accept_and_a_violation_changes_nothing(url, runtime):
    async with joined(url, "v", ["keep"]) as (ann,):
        too_many = [f"t{i}" for i in range(11)]
        assert await ask(ann, "set_tags", tags=too_many) == (
            "error: InvalidArgumentError: set_tags(): 11 distinct tags; the limit is 10"
        )
        long = "x" * 257
        assert await ask(ann, "add_tag", tag=long) == (
            f"error: InvalidArgumentError: add_tag(): tag {long[:40]!r}… is 257 UTF-8 bytes; the limit is 256"
        )
        assert await ask(ann, "set_tags", tags="red") == (
            "error: InvalidArgumentError: set_tags(): tags must be a list of str, not the str 'red'"
        )
        assert await ask(ann, "remove_tag", tag=3) == (
            "error: InvalidArgumentError: remove_tag(): the tag must be a str, got 3"
        )
        await ask(ann, "set_tags", tags=[f"t{i}" for i in range(9)])
        assert await ask(ann, "add_tag", tag="t9") is None
        assert await ask(ann, "add_tag", tag="t10") == (
            "error: InvalidArgumentError: add_tag(): 11 distinct tags; the limit is 10"
        )
        assert await ask(ann, "tags") == [f"t{i}" for i in range(10)]
        assert sorted(runtime.find("ROOMS", "v").tagged) == sorted(f"t{i}" for i in range(10))


# -- 4. auto-responses for real protocols ------------------------------------------------------

#: MQTT's keep-alive: PINGREQ (0xC0 0x00) is answered with PINGRESP (0xD0 0x00).
MQTT_PING = {"hex": ["c000", "d000"]}


@pytest.mark.gen_test
async def test_several_pairs_text_and_binary_are_answered_without_waking(url, runtime, clock, recorder, flags):
    flags["pairs"] = [["ping", "pong"], MQTT_PING, ["2", "3"]]
    async with joined(url, "a", []) as (ws,):
        host = hibernate(runtime, clock, "a")
        await ws.send(b"\xc0\x00")
        await ws.send("ping")
        await ws.send("2")
        assert await receive(ws, 3) == [b"\xd0\x00", "pong", "3"]
        assert host.lifecycle.state is ObjectState.HIBERNATING
        assert len(recorder.of("constructor")) == 1
        assert runtime.stats.auto_responses == 3
        # the same characters as text are not the binary request: they reach the handler
        await ws.send("\xc0\x00")
        assert await receive(ws) == ["handler:\xc0\x00"]
        await ws.send(b"\xc0\x01")  # no pair has this request
        assert await receive(ws) == [b"handler:\xc0\x01"]
        assert await ask(ws, "pairs") == {
            "all": [["ping", "pong"], ["c000", "d000"], ["2", "3"]],
            "one": ["ping", "pong"],
        }


@pytest.mark.gen_test
async def test_each_pair_has_its_own_last_used_time_across_hibernation(url, runtime, clock, flags):
    flags["pairs"] = [["ping", "pong"], MQTT_PING]
    async with joined(url, "s", []) as (ws,):
        assert await ask(ws, "stamp", request="ping") is None
        hibernate(runtime, clock, "s")
        await ws.send("ping")
        assert await receive(ws) == ["pong"]
        pinged = clock.now().isoformat()
        clock.advance(5)
        await ws.send(b"\xc0\x00")
        assert await receive(ws) == [b"\xd0\x00"]
        mqtt = clock.now().isoformat()
        assert mqtt != pinged
        # a new instance reads each pair's time on this socket, and the latest of all
        assert await ask(ws, "stamp", request="ping") == pinged
        assert await ask(ws, "stamp", hex="c000") == mqtt
        assert await ask(ws, "stamp") == mqtt
        assert await ask(ws, "stamp", request="c000") is None  # text, not the binary request


@pytest.mark.gen_test
async def test_the_one_pair_call_still_replaces_and_clears_every_pair(url, flags):
    flags["pairs"] = [["a", "1"], ["b", "2"]]
    async with joined(url, "o", []) as (ws,):
        assert await ask(ws, "set_pair", pair=["c", "3"]) is None
        assert await ask(ws, "pairs") == {"all": [["c", "3"]], "one": ["c", "3"]}
        await ws.send("a")  # no longer a request: the handler gets it
        assert await receive(ws) == ["handler:a"]
        await ws.send("c")
        assert await receive(ws) == ["3"]
        assert await ask(ws, "set_pair") is None
        assert await ask(ws, "pairs") == {"all": [], "one": None}
        assert await ask(ws, "set_pairs", pairs=[MQTT_PING]) is None
        assert await ask(ws, "pairs") == {"all": [["c000", "d000"]], "one": ["c000", "d000"]}
        await ws.send(b"\xc0\x00")
        assert await receive(ws) == [b"\xd0\x00"]


@pytest.mark.gen_test
async def test_pairs_have_limits_and_a_bad_list_changes_nothing(url, flags):
    flags["pairs"] = [["ping", "pong"]]
    async with joined(url, "l", []) as (ws,):
        assert await ask(ws, "set_pairs", pairs=[[f"q{i}", "r"] for i in range(17)]) == (
            "error: InvalidArgumentError: set_web_socket_auto_responses(): 17 pairs; the limit is 16"
        )
        assert await ask(ws, "set_pairs", pairs=[["x", "1"], ["x", "2"]]) == (
            "error: InvalidArgumentError: set_web_socket_auto_responses(): two pairs have the request 'x'; "
            "each request needs one response"
        )
        assert await ask(ws, "set_pairs", pairs=[{"hex": ["00" * 2049, "00"]}]) == (
            "error: InvalidArgumentError: set_web_socket_auto_responses(): the request is 2049 bytes; the limit is 2048"
        )
        assert await ask(ws, "pairs") == {"all": [["ping", "pong"]], "one": ["ping", "pong"]}
        await ws.send("ping")
        assert await receive(ws) == ["pong"]


@pytest.mark.gen_test
async def test_the_times_a_socket_keeps_are_bounded_by_the_pairs_limit(url, runtime, flags):
    async with joined(url, "b", []) as (ws,):
        for round_ in range(4):
            requests = [f"r{round_}-{i}" for i in range(16)]
            assert await ask(ws, "set_pairs", pairs=[[r, "ok"] for r in requests]) is None
            for r in requests:
                await ws.send(r)
            assert await receive(ws, 16) == ["ok"] * 16
        (link,) = runtime.find("ROOMS", "b").sockets
        assert sorted(link.auto_response_times) == sorted(f"r3-{i}" for i in range(16))
        assert await ask(ws, "stamp", request="r0-0") is None


# -- 5. idle time from a handler ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_hibernate_now_hibernates_when_the_turn_ends_and_the_socket_stays(url, runtime, recorder):
    async with joined(url, "h", ["x"]) as (ws,):
        host = runtime.find("ROOMS", "h")
        assert await ask(ws, "hibernate_now") is None
        assert host.lifecycle.state is ObjectState.HIBERNATING  # no sweep: at the end of the turn
        assert host.instance is None
        # the socket stays open with its tags, and the next message builds a new instance
        assert await ask(ws, "tags") == ["x"]
        assert len(recorder.of("constructor")) == 2
        assert host.lifecycle.state is ObjectState.ACTIVE
        assert runtime.sweep(now=runtime.clock() + 9) == 0  # and the class's idle time applies again
        # called outside any event, by an idle object: at once
        assert await ask(ws, "hibernate_soon") is None
        await until(lambda: host.lifecycle.state is ObjectState.HIBERNATING)


@pytest.mark.gen_test
async def test_keep_awake_until_holds_off_the_idle_time_until_then(url, runtime, clock, recorder):
    async with joined(url, "k", []) as (ws,):
        host = runtime.find("ROOMS", "k")
        later = clock.now() + datetime.timedelta(seconds=60)
        assert await ask(ws, "keep_awake_until", iso=later.isoformat()) is None
        start = clock.monotonic()
        assert runtime.sweep(now=start + 30) == 0  # idle for 30 s with hibernate_after = 10
        assert host.lifecycle.state is ObjectState.ACTIVE
        # from that time on, the usual idle time counts
        assert runtime.sweep(now=start + 65) == 0
        assert runtime.sweep(now=start + 71) == 1
        assert host.lifecycle.state is ObjectState.HIBERNATING
        # a hibernation ends it: the next instance has the usual idle time
        assert await ask(ws, "tags") == []
        assert runtime.sweep(now=start + 82) == 1
        assert len(recorder.of("constructor")) == 2


@pytest.mark.gen_test
async def test_keep_awake_until_is_cancelled_by_none_by_the_past_and_by_hibernate_now(url, runtime, clock):
    async with joined(url, "n", []) as (ws,):
        host = runtime.find("ROOMS", "n")
        far = (clock.now() + datetime.timedelta(hours=1)).timestamp() * 1000
        assert await ask(ws, "keep_awake_until", raw=far) is None  # epoch milliseconds
        assert await ask(ws, "keep_awake_until") is None
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        assert await ask(ws, "keep_awake_until", raw=far) is None
        assert await ask(ws, "keep_awake_until", raw=0) is None  # already past
        assert runtime.sweep(now=clock.monotonic() + 10) == 1
        assert await ask(ws, "keep_awake_until", raw=far) is None
        assert await ask(ws, "hibernate_now") is None
        assert host.lifecycle.state is ObjectState.HIBERNATING
        assert await ask(ws, "keep_awake_until", raw="soon") == (
            "error: InvalidArgumentError: keep_awake_until() takes a datetime or epoch milliseconds, got 'soon'"
        )
        assert await ask(ws, "keep_awake_until", iso="2030-01-01T00:00:00") == (
            "error: InvalidArgumentError: keep_awake_until(): give an aware datetime (with tzinfo) "
            "or epoch milliseconds"
        )


# -- 6. counting without waking ----------------------------------------------------------------

OPEN, CLOSING = 1, 2


@pytest.mark.gen_test
async def test_counts_and_state_filters_agree_with_the_sockets_across_hibernation(url, runtime, clock, recorder):
    async with joined(url, "n", ["red"], ["red", "blue"], ["blue"]) as (ann, bob, cat):
        assert await ask(ann, "count") == 3
        assert await ask(ann, "count", tag="red") == 2
        assert await ask(ann, "count", tag="nobody") == 0
        hibernate(runtime, clock, "n")
        await ask(bob, "remove_tag", tag="red")
        await ask(bob, "add_tag", tag="green")
        assert await ask(ann, "count", tag="red") == 1
        assert await ask(ann, "count", tag="blue") == 2
        hibernate(runtime, clock, "n")
        # the object closes cat: until cat answers, cat is closing
        assert await ask(ann, "close_tagged", tag="blue", keep=["blue", "green"]) == {
            "closing": 1,
            "open": 2,
            "open blue": 1,
            "listed closing": 1,
            "all": 3,
        }
        async with asyncio.timeout(5):
            await cat.wait_closed()
        await recorder.wait_for(lambda r: r.of("close"))
        assert await ask(ann, "count") == 2
        assert await ask(ann, "count", state=CLOSING) == 0
        assert await ask(ann, "listed", tag="blue", state=OPEN) == 1
        assert await ask(ann, "count", tag=5) == (
            "error: InvalidArgumentError: count_web_sockets(): tag must be a str or None, got 5"
        )
        assert await ask(ann, "listed", state=7) == (
            "error: InvalidArgumentError: get_web_sockets(): state must be a ReadyState (0 to 3) or None, got 7"
        )


@pytest.fixture
def admin_server(io_loop, tmp_path, recorder):
    server = Server(beyond_app(recorder, {}), Settings(port=0, admin_port=0, data_dir=str(tmp_path / "d")))
    io_loop.run_sync(server.start)
    yield server
    if server.phase != "stopped":
        io_loop.run_sync(server.stop)


@pytest.mark.gen_test
async def test_objects_shows_the_sockets_per_tag_of_a_hibernated_object(admin_server, io_loop):
    server = admin_server
    base = f"ws://127.0.0.1:{server.port}/lobby/ws?tags="
    async with connect(base + "player,red") as ann, connect(base + "player,blue"), connect(base + "player"):
        await ask(ann, "add_tag", tag="captain")
        assert server.runtime.sweep(now=io_loop.time() + 60) == 1
        answer = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{server.admin_port}/objects")
        (room,) = json.loads(answer.body)["objects"]
        assert room["state"] == "hibernating"
        assert room["hibernatable_sockets"] == 3
        assert room["tags"] == {"player": 3, "red": 1, "blue": 1, "captain": 1}
        assert next(iter(room["tags"])) == "player"  # the biggest first
        assert room["distinct_tags"] == 4
