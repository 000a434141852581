"""The chat example (wsecho/examples/chat.py), tested with wsecho.testing, which this also tests."""

import asyncio
import contextlib
import json
import re
import subprocess
import sys

import pytest

from wsecho import App, DurableObject, InvalidArgumentError, InvalidStateError, Response
from wsecho.examples.chat import ChatRoom, make_app
from wsecho.testing import FakeClock, receive, receive_json, serve_app

HOUR = 3600
START_MS = 1767225600000  # FakeClock's default start, 2026-01-01 00:00 UTC


class SmallRoom(ChatRoom):
    history_size = 3


@contextlib.asynccontextmanager
async def chat(room=ChatRoom, **settings):
    """The chat served in-process, its rooms reading the harness's fake clock."""
    clock = FakeClock()
    async with serve_app(make_app(room=room, clock=clock.time), clock=clock, **settings) as t:
        yield t


async def join(t, name, room="kitchen", address="127.0.0.1"):
    """A joined client (from ``address``, any of 127/8) and the history it was given; the
    presence frame is consumed."""
    ws = await t.connect(f"/rooms/{room}/websocket?name={name}", local_addr=(address, 0))
    history = await receive_json(ws)
    assert history["type"] == "history"
    presence = await receive_json(ws)
    assert presence["type"] == "presence"
    assert name in presence["users"]
    return ws, history["messages"]


async def say(ws, text):
    await ws.send(json.dumps({"type": "message", "text": text}))


async def talk(ws, *texts):
    """Send each text and wait until it comes back, stored and broadcast."""
    for text in texts:
        await say(ws, text)
        assert (await next_of(ws, "message"))["text"] == text


async def next_of(ws, kind):
    """The next frame of type ``kind``, skipping others (presence updates)."""
    while (frame := await receive_json(ws))["type"] != kind:
        pass
    return frame


# -- the page ------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_page_is_served_at_the_root_and_for_each_room_without_waking_it():
    async with chat() as t:
        for path in ("/", "/rooms/kitchen", "/rooms/kitchen/"):
            page = await t.fetch(path)
            assert page.status == 200, path
            assert page.headers.get("Content-Type") == "text/html;charset=UTF-8"
            assert b"/websocket" in page.body
            assert b'"keepAliveMs": 20000' in page.body
            assert "script-src 'sha256-" in page.headers.get("Content-Security-Policy")
        assert t.state("ROOMS", "kitchen") is None  # the worker served it; no room woke
        head = await t.fetch("/rooms/kitchen", method="HEAD")
        assert (head.status, head.body) == (200, b"")
        assert head.headers.get("Content-Length") == str(len(page.body))


@pytest.mark.gen_test
async def test_other_paths_and_methods_are_refused_with_a_reason():
    async with chat() as t:
        missing = await t.fetch("/elsewhere")
        assert missing.status == 404
        assert b"The chat is at / and /rooms/<room>." in missing.body
        bad_room = await t.fetch("/rooms/no%20spaces")
        assert bad_room.status == 404
        assert b"is not a room name: use 1 to 64 letters, digits, _ or -" in bad_room.body
        post = await t.fetch("/", method="POST", body="x")
        assert post.status == 405
        plain = await t.fetch("/rooms/kitchen/websocket")
        assert plain.status == 426
        assert b"connect with Upgrade: websocket" in plain.body


# -- joining, history, presence --------------------------------------------------------------


@pytest.mark.gen_test
async def test_joining_gets_the_history_then_the_presence():
    async with chat() as t:
        ann = await t.connect("/rooms/kitchen/websocket?name=ann")
        assert await receive_json(ann) == {"type": "history", "messages": []}
        assert await receive_json(ann) == {"type": "presence", "users": ["ann"], "count": 1}
        assert t.state("ROOMS", "kitchen") == "active"
        assert t.constructions("ROOMS", "kitchen") == 1


@pytest.mark.gen_test
async def test_a_message_reaches_everyone_with_its_name_and_time():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        bob, _ = await join(t, "bob")
        await say(ann, "  hello bob  ")
        expected = {"type": "message", "name": "ann", "text": "hello bob", "at": START_MS}
        assert await next_of(ann, "message") == expected
        assert await next_of(bob, "message") == expected


@pytest.mark.gen_test
async def test_the_history_is_replayed_after_a_reload():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        for i in range(3):
            await say(ann, f"m{i}")
            await next_of(ann, "message")
            t.clock.advance(1)
        await ann.close()  # the page reloads: a new socket, same name
        ann, history = await join(t, "ann")
        assert history == [{"name": "ann", "text": f"m{i}", "at": START_MS + i * 1000} for i in range(3)]


@pytest.mark.gen_test
async def test_the_history_keeps_the_last_n_messages():
    async with chat(room=SmallRoom) as t:
        ann, _ = await join(t, "ann")
        for i in range(5):
            await say(ann, f"m{i}")
            await next_of(ann, "message")
            t.clock.advance(2.5)  # stay under the rate limit
        _, history = await join(t, "bob")
        assert [m["text"] for m in history] == ["m2", "m3", "m4"]
        stored = await t.storage("ROOMS", "kitchen").snapshot(prefix="msg:")
        assert [m["text"] for m in stored.values()] == ["m2", "m3", "m4"]


@pytest.mark.gen_test
async def test_the_history_survives_a_server_restart(tmp_path):
    async with chat(data_dir=tmp_path) as t:
        ann, _ = await join(t, "ann")
        await say(ann, "still here tomorrow?")
        await next_of(ann, "message")
    async with chat(data_dir=tmp_path) as t:
        _, history = await join(t, "bob")
        assert [(m["name"], m["text"]) for m in history] == [("ann", "still here tomorrow?")]


@pytest.mark.gen_test
async def test_presence_updates_on_join_and_leave():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        bob, _ = await join(t, "bob")
        assert await receive_json(ann) == {"type": "joined", "name": "bob"}
        bob_again = await t.connect("/rooms/kitchen/websocket?name=bob")  # a second tab: still one bob
        await next_of(bob_again, "history")
        assert await receive_json(bob_again) == {"type": "presence", "users": ["ann", "bob"], "count": 2}
        await bob.close()  # bob is still there in his other tab: ann hears nothing of either
        await bob_again.close()
        assert await receive_json(ann) == {"type": "left", "name": "bob"}


@pytest.mark.gen_test
async def test_a_join_costs_each_member_one_small_frame_however_full_the_room():
    # The member list went to every member on every join: O(N) bytes each, O(N^2) per join.
    async with chat() as t:
        members = []
        for i in range(40):
            name = f"member-{i:02d}"
            ws, _ = await join(t, name)
            for other in members:
                frame = await receive(other)
                assert json.loads(frame) == {"type": "joined", "name": name}
                assert len(frame.encode()) == 39  # the same for the 1st member and the 39th
            members.append(ws)
        # the last to join saw the first names and the count; everyone heard only that
        await members[0].send(json.dumps({"type": "message", "text": "all here"}))
        for ws in members:
            assert (await receive_json(ws))["text"] == "all here"


class ShortList(ChatRoom):
    member_list_size = 3
    max_members = 4


@pytest.mark.gen_test
async def test_the_joiner_gets_the_first_names_and_the_count_and_a_full_room_says_so():
    async with chat(room=ShortList) as t:
        ann, _ = await join(t, "ann")
        for name in ("bob", "cat"):
            await join(t, name)
        dan = await t.connect("/rooms/kitchen/websocket?name=dan")
        await next_of(dan, "history")
        assert await receive_json(dan) == {"type": "presence", "users": ["ann", "bob", "cat"], "count": 4}
        eve = await t.connect("/rooms/kitchen/websocket?name=eve")
        assert await receive_json(eve) == {
            "type": "error",
            "message": "the room is full: it has its limit of 4 members; try again later",
        }
        async with asyncio.timeout(5):
            await eve.wait_closed()
        assert (eve.close_code, eve.close_reason) == (1013, "room is full")
        # nobody heard of eve; once dan leaves there is room again
        assert [await receive_json(ann) for _ in range(3)] == [
            {"type": "joined", "name": name} for name in ("bob", "cat", "dan")
        ]
        await dan.close()
        assert await receive_json(ann) == {"type": "left", "name": "dan"}
        eve = await t.connect("/rooms/kitchen/websocket?name=eve")
        await next_of(eve, "history")
        assert await receive_json(eve) == {"type": "presence", "users": ["ann", "bob", "cat"], "count": 4}
        assert await receive_json(ann) == {"type": "joined", "name": "eve"}


@pytest.mark.gen_test
async def test_a_room_hibernated_between_messages_still_delivers_them():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        bob, _ = await join(t, "bob")
        await receive_json(ann)  # bob's arrival
        for i in range(3):
            t.hibernate("ROOMS", "kitchen")
            assert t.state("ROOMS", "kitchen") == "hibernating"
            assert t.constructions("ROOMS", "kitchen") == 1 + i
            sender, receiver = (ann, bob) if i % 2 == 0 else (bob, ann)
            await say(sender, f"after nap {i}")
            assert (await next_of(receiver, "message"))["text"] == f"after nap {i}"
            assert (await next_of(sender, "message"))["text"] == f"after nap {i}"
            assert t.constructions("ROOMS", "kitchen") == 2 + i  # the constructor ran again
        # the names came back from the attachments and the tags, not from memory
        await bob.close()
        assert await receive_json(ann) == {"type": "left", "name": "bob"}


@pytest.mark.gen_test
async def test_an_idle_room_hibernates_after_its_timeout():
    async with chat(hibernate_after=30) as t:
        ann, _ = await join(t, "ann")
        await t.advance(29)
        assert t.state("ROOMS", "kitchen") == "active"
        await t.advance(1)
        assert t.state("ROOMS", "kitchen") == "hibernating"
        await say(ann, "wake up")
        assert (await next_of(ann, "message"))["text"] == "wake up"
        assert t.state("ROOMS", "kitchen") == "active"


@pytest.mark.gen_test
async def test_the_keep_alive_is_answered_without_waking_the_room():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        t.hibernate("ROOMS", "kitchen")
        for _ in range(3):
            await ann.send("ping")
            assert await receive(ann) == "pong"
        assert t.state("ROOMS", "kitchen") == "hibernating"
        assert t.constructions("ROOMS", "kitchen") == 1
        assert t.runtime.stats.auto_responses == 3


# -- limits ------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_rate_limit_answers_with_an_error_and_survives_hibernation():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        bob, _ = await join(t, "bob")
        await talk(ann, *(f"m{i}" for i in range(5)))
        t.hibernate("ROOMS", "kitchen")  # the bucket is in storage: it survives
        await say(ann, "one too many")
        assert await next_of(ann, "error") == {
            "type": "error",
            "message": "slow down: at most 5 messages per 10 seconds; try again in 2.0 s",
        }
        # the limit is per name: bob may talk
        await say(bob, "my turn")
        assert (await next_of(ann, "message"))["text"] == "my turn"
        t.clock.advance(2)  # one token back
        await say(ann, "one more")
        assert (await next_of(ann, "message"))["text"] == "one more"
        await say(ann, "and another")
        assert (await receive_json(ann))["type"] == "error"
        stored = await t.storage("ROOMS", "kitchen").snapshot(prefix="msg:")
        assert [m["text"] for m in stored.values()] == ["m0", "m1", "m2", "m3", "m4", "my turn", "one more"]


@pytest.mark.gen_test
async def test_reconnecting_or_changing_names_does_not_refill_the_rate_limit():
    # The bucket lived in the socket's attachment: a new socket came with a full one.
    async with chat() as t:
        ann, _ = await join(t, "ann")
        await talk(ann, *(f"m{i}" for i in range(5)))
        await ann.close()
        ann, _ = await join(t, "ann")
        await say(ann, "fresh start?")
        assert (await receive_json(ann))["message"].startswith("slow down: at most 5 messages per 10 seconds")
        # new names from the same address: 20 messages per 10 seconds, whatever the names
        for name in ("ann2", "ann3", "ann4"):
            ws, _ = await join(t, name)
            await talk(ws, *(f"{name} {i}" for i in range(5)))
        ann5, _ = await join(t, "ann5")
        await say(ann5, "one more name")
        assert await next_of(ann5, "error") == {
            "type": "error",
            "message": "slow down: at most 20 messages per 10 seconds from one address; try again in 0.5 s",
        }
        # the runtime sets the address header from the connection: a client cannot forge it
        forger = await t.connect(
            "/rooms/kitchen/websocket?name=ann6", additional_headers={"CF-Connecting-IP": "10.9.8.7"}
        )
        await say(forger, "I am someone else")
        assert (await next_of(forger, "error"))["message"].endswith("from one address; try again in 0.5 s")
        # someone at another address is not held back
        bob, _ = await join(t, "bob", address="127.0.0.2")
        await say(bob, "hello from elsewhere")
        assert (await next_of(bob, "message"))["text"] == "hello from elsewhere"
        stored = await t.storage("ROOMS", "kitchen").snapshot(prefix="rate:")
        assert set(stored) == {
            *(f"rate:name:{name}" for name in ("ann", "ann2", "ann3", "ann4", "bob")),
            "rate:address:127.0.0.1",
            "rate:address:127.0.0.2",
        }


class FewTalkers(ChatRoom):
    max_talkers = 2


@pytest.mark.gen_test
async def test_the_rate_limit_rows_are_bounded_and_pruned_once_full_again():
    async with chat(room=FewTalkers) as t:
        storage = t.storage("ROOMS", "kitchen")
        ann, _ = await join(t, "ann")
        bob, _ = await join(t, "bob")
        await talk(ann, "hi")
        await say(bob, "me too")  # a third row (bob's name) would be over the limit of 2
        assert await next_of(bob, "error") == {
            "type": "error",
            "message": "the room is busy: 2 names and addresses talked in the last 10 seconds "
            "(the limit is 2); try again in a moment",
        }
        t.clock.advance(10)  # ann's buckets are full again: their rows can go
        await say(bob, "me too")
        assert (await next_of(bob, "message"))["text"] == "me too"
        assert set(await storage.snapshot(prefix="rate:")) == {"rate:name:bob", "rate:address:127.0.0.1"}


BAD_FRAMES = [
    ("not json", 'not JSON; send {"type": "message", "text": "hello"}'),
    ("[1, 2]", 'expected a JSON object like {"type": "message", "text": "hello"}, got list'),
    ('{"text": "hi"}', 'the object has no "type"; send {"type": "message", "text": "hello"}'),
    ('{"type": "join"}', 'unknown type "join"; the only type a client sends is "message"'),
    ('{"type": "message"}', '"text" must be a string, got null'),
    ('{"type": "message", "text": 42}', '"text" must be a string, got 42'),
    ('{"type": "message", "text": "   "}', "the message is empty"),
    (json.dumps({"type": "message", "text": "x" * 1001}), "a message is at most 1000 characters; this one has 1001"),
    ("x" * 16385, "a frame is at most 16384 characters; this one has 16385"),
    # json.loads makes a lone surrogate of the escape, which UTF-8 storage cannot hold
    (
        '{"type": "message", "text": "ok \\ud800"}',
        "the message has a lone surrogate (U+D800 at character 4): not Unicode text; pair it or leave it out",
    ),
    ("[" * 5000, 'not JSON; send {"type": "message", "text": "hello"}'),
    (b"\x01\x02", 'binary frames are not supported; send JSON text like {"type": "message", "text": "hello"}'),
]


@pytest.mark.parametrize(("frame", "error"), BAD_FRAMES)
@pytest.mark.gen_test
async def test_bad_input_is_answered_with_an_error_frame(frame, error):
    async with chat() as t:
        ann, _ = await join(t, "ann")
        bob, _ = await join(t, "bob")
        await receive_json(ann)  # bob's arrival
        await ann.send(frame)
        assert await receive_json(ann) == {"type": "error", "message": error}
        # the socket stays open, nothing was stored or sent to others, and errors do not
        # use up the rate limit
        for i in range(5):
            await say(ann, f"ok {i}")
            assert (await next_of(bob, "message"))["text"] == f"ok {i}"
        assert len(await t.storage("ROOMS", "kitchen").snapshot(prefix="msg:")) == 5


@pytest.mark.gen_test
async def test_the_longest_message_and_name_are_accepted():
    async with chat() as t:
        name = "n" * 32
        ws, _ = await join(t, name)
        await say(ws, "x" * 1000)
        frame = await next_of(ws, "message")
        assert (frame["name"], len(frame["text"])) == (name, 1000)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("", "choose a name of 1 to 32 characters"),
        ("?name=", "choose a name of 1 to 32 characters"),
        ("?name=%20%20", "choose a name of 1 to 32 characters"),
        ("?name=" + "x" * 33, "a name is at most 32 characters; this one has 33"),
        ("?name=a%07b", "a name cannot contain control characters"),
    ],
)
@pytest.mark.gen_test
async def test_a_bad_name_is_refused_with_an_error_frame_and_1008(query, error):
    async with chat() as t:
        ann, _ = await join(t, "ann")
        ws = await t.connect(f"/rooms/kitchen/websocket{query}")
        assert await receive_json(ws) == {"type": "error", "message": error}
        async with asyncio.timeout(5):
            await ws.wait_closed()
        assert (ws.close_code, ws.close_reason) == (1008, "invalid name")
        # nobody saw a presence change, and the next frame ann gets is her own message
        await say(ann, "still alone")
        assert await receive_json(ann) == {"type": "message", "name": "ann", "text": "still alone", "at": START_MS}


class Chatty(ChatRoom):
    rate_limit = address_rate_limit = 100


@pytest.mark.gen_test
async def test_the_history_frame_is_bounded_by_bytes_and_an_emoji_costs_4_bytes():
    # 50 messages of 1,000 emoji made a 602,683-byte history frame (12 bytes per emoji).
    async with chat(room=Chatty) as t:
        ann, _ = await join(t, "ann")
        for i in range(50):
            await ann.send(json.dumps({"type": "message", "text": f"{i:02d}" + "\U0001f600" * 998}, ensure_ascii=False))
            frame = await receive(ann)
            assert len(frame.encode()) < 4100  # 998 emoji of 4 bytes, and the rest
        bob = await t.connect("/rooms/kitchen/websocket?name=bob")
        history = await receive(bob)
        assert len(history.encode()) <= 64 * 1024
        texts = [m["text"][:2] for m in json.loads(history)["messages"]]
        assert texts == [f"{i:02d}" for i in range(50 - len(texts), 50)]  # the newest, oldest first
        assert len(texts) == 16  # as many as fit: 16 of about 4,030 bytes


# -- storage and the alarm ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_messages_are_stored_under_keys_that_sort_by_time():
    async with chat() as t:
        ann, _ = await join(t, "ann")
        for text in ("first", "same millisecond"):
            await say(ann, text)
            await next_of(ann, "message")
        t.clock.advance(0.25)
        await say(ann, "later")
        await next_of(ann, "message")
        stored = await t.storage("ROOMS", "kitchen").snapshot()
        assert stored == {
            f"msg:{START_MS}:000000000001": {"name": "ann", "text": "first", "at": START_MS},
            f"msg:{START_MS}:000000000002": {"name": "ann", "text": "same millisecond", "at": START_MS},
            f"msg:{START_MS + 250}:000000000003": {"name": "ann", "text": "later", "at": START_MS + 250},
            "meta": {"seq": 3, "at": START_MS + 250},
            # ann's buckets: 5 and 20 tokens, 3 spent, 0.125 back after 250 ms
            "rate:name:ann": {"tokens": 2.125, "at": START_MS + 250},
            "rate:address:127.0.0.1": {"tokens": 17.5, "at": START_MS + 250},
        }
        assert all(re.fullmatch(r"msg:\d{13}:\d{12}", k) for k in stored if k.startswith("msg:"))
        # the pruning alarm is set for the oldest message's expiry
        assert await t.storage("ROOMS", "kitchen").get_alarm() == START_MS + 24 * HOUR * 1000


@pytest.mark.gen_test
async def test_the_alarm_prunes_old_messages_while_time_is_advanced():
    async with chat() as t:
        storage = t.storage("ROOMS", "kitchen")
        ann, _ = await join(t, "ann")
        await say(ann, "old")
        await next_of(ann, "message")
        await t.advance(12 * HOUR)  # idle: the room hibernated, its alarm is 12 h away
        assert t.state("ROOMS", "kitchen") == "hibernating"
        assert [m["text"] for m in (await storage.snapshot(prefix="msg:")).values()] == ["old"]
        await say(ann, "newer")
        await next_of(ann, "message")
        assert len(await storage.snapshot(prefix="msg:")) == 2
        woken = t.constructions("ROOMS", "kitchen")
        await t.advance(12 * HOUR)  # "old" is a day old: the alarm wakes the room and prunes it
        assert [m["text"] for m in (await storage.snapshot(prefix="msg:")).values()] == ["newer"]
        assert t.constructions("ROOMS", "kitchen") == woken + 1
        assert await storage.get_alarm() == START_MS + 36 * HOUR * 1000
        await t.advance(12 * HOUR)
        assert await storage.get_alarm() is None
        # nothing is left behind: no message, no meta row, no rate-limit row
        assert await storage.snapshot() == {}
        # a room whose history was pruned still works and replays nothing
        _, history = await join(t, "bob")
        assert history == []


# -- wsecho.testing itself ---------------------------------------------------------------------


class Waiter(DurableObject):
    """Its RPC method ``wait()`` holds the object's turn until env.GATE resolves."""

    async def wait(self):
        await self.env.GATE
        return "done"


async def no_worker(request, env):
    return Response("no worker here", status=404)


@pytest.mark.gen_test
async def test_the_harness_names_what_keeps_an_object_from_hibernating():
    gate = asyncio.get_running_loop().create_future()
    app = App(fetch=no_worker, bindings={"WAITERS": Waiter}, vars={"GATE": gate})
    async with serve_app(app) as t:
        call = asyncio.ensure_future(t.runtime.env.WAITERS.get_by_name("w").wait())
        await asyncio.sleep(0)  # one loop turn: the call is submitted and its turn starts
        assert t.state("WAITERS", "w") == "active"
        with pytest.raises(InvalidStateError, match="WAITERS 'w' cannot hibernate now: an event is being handled"):
            t.hibernate("WAITERS", "w")
        with pytest.raises(InvalidStateError, match="1 object cannot hibernate now: WAITERS 'w': an event"):
            t.hibernate_all()
        gate.set_result(None)
        await t.settle()
        assert call.result() == "done"
        assert t.hibernate_all() == 1
        assert t.state("WAITERS", "w") is None  # hibernated with no sockets: forgotten
        t.hibernate("WAITERS", "w")  # already hibernating: nothing to do
        t.hibernate("WAITERS", "never-used")
        assert t.state("WAITERS", "never-used") is None
        assert t.constructions("WAITERS", "never-used") == 0
        with pytest.raises(InvalidArgumentError, match="no binding 'ROOMS' \\(its bindings: WAITERS\\)"):
            t.state("ROOMS", "kitchen")


@pytest.mark.gen_test
async def test_the_harness_reads_storage_without_waking_or_tracking_an_object():
    async with chat() as t:
        assert await t.storage("ROOMS", "empty").snapshot() == {}
        assert await t.storage("ROOMS", "empty").get("meta") is None
        assert t.state("ROOMS", "empty") is None


def test_connect_without_websockets_says_how_to_get_it():
    # A separate interpreter in which `import websockets` fails, as where it is not installed.
    script = """
import asyncio, sys
sys.modules["websockets"] = None
from wsecho.examples.chat import app
from wsecho.testing import serve_app

async def main():
    async with serve_app(app) as t:
        try:
            await t.connect("/rooms/kitchen/websocket?name=ann")
        except ModuleNotFoundError as exc:
            print(exc)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert "Harness.connect() needs the websockets package, a test dependency of wsecho" in done.stdout
    assert "pip install 'websockets>=13'" in done.stdout
