"""What wsecho gives beyond Cloudflare's hibernation API, with real clients: tags that change
(workerd#3160), several and binary auto-responses (workerd#6062), idle control from a handler,
and counting sockets without building them; each also across a hibernation."""

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.client import connect

from tests.apps.beyond import beyond_app
from wsecho.core.lifecycle import ObjectState

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
