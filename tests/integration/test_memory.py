"""Bounded memory with real clients (docs/decisions/0010): --max-active-objects hibernates the
least recently used idle object, memory pressure (a fake cgroup) hibernates down to the low
mark, objects that cannot hibernate never are, and an evicted object wakes intact."""

import asyncio
import contextlib
import json
import logging
import os
import re

import pytest
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect

from tests.apps.memory import memory_app
from tests.helpers import Recorder, constructions, until
from wsecho.core.errors import ConfigError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.memory import Mark, MemoryReading
from wsecho.serve.config import Settings, build_parser, settings_from
from wsecho.serve.memory import MemoryReader, own_cgroup
from wsecho.serve.server import Server

ACTIVE, HIBERNATING = ObjectState.ACTIVE, ObjectState.HIBERNATING


@contextlib.asynccontextmanager
async def served(tmp_path, *, sweeper=False, **options):
    """A server of the memory app (memory pressure off unless asked), its recorder and gate."""
    recorder = Recorder()
    gate = asyncio.get_running_loop().create_future()
    settings = Settings(
        port=0,
        admin_port=0,
        data_dir=str(tmp_path / "d"),
        hibernate_after=600,
        **{"memory_high": None, **options},
    )
    server = Server(memory_app(recorder, gate), settings, sweeper=sweeper)
    await server.start()
    try:
        yield server, recorder, gate
    finally:
        if not gate.done():
            gate.set_result(None)
        await server.stop()


@contextlib.asynccontextmanager
async def rooms(server, *names, query=""):
    """One socket to each room, each answered once (so each room is in memory)."""
    async with contextlib.AsyncExitStack() as stack:
        sockets = {}
        for name in names:
            ws = sockets[name] = await stack.enter_async_context(
                connect(f"ws://127.0.0.1:{server.port}/{name}/ws{query}")
            )
            assert await ask(ws, "hi") == f"{name} hi"
        yield sockets


async def ask(ws, message):
    await ws.send(message)
    async with asyncio.timeout(5):
        return await ws.recv()


def state(server, name):
    host = server.runtime.find("ROOMS", name)
    return HIBERNATING if host is None else host.lifecycle.state


async def admin(server, path):
    response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{server.admin_port}{path}")
    return response.body.decode()


def metric(text, name, labels=""):
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+]+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{{{labels}}} not in the metrics"
    return float(match.group(1))


async def described(server, name):
    (obj,) = [o for o in json.loads(await admin(server, "/objects"))["objects"] if o["name"] == name]
    return obj


# -- --max-active-objects ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_least_recently_used_object_is_hibernated_first(tmp_path):
    async with served(tmp_path, max_active_objects=3) as (server, _, _), rooms(server, "a", "b", "c") as ws:
        assert await ask(ws["a"], "again") == "a again"  # b is now the least recently used
        async with rooms(server, "d"):
            assert [state(server, n) for n in "abcd"] == [ACTIVE, HIBERNATING, ACTIVE, ACTIVE]
            assert await ask(ws["c"], "again") == "c again"  # a is now the least recently used
            async with rooms(server, "e"):
                assert [state(server, n) for n in "acde"] == [HIBERNATING, ACTIVE, ACTIVE, ACTIVE]
                assert server.runtime.active_count() == 3
                text = await admin(server, "/metrics")
                assert metric(text, "wsecho_evictions_total", 'reason="limit"') == 2
                assert metric(text, "wsecho_objects_in_memory") == 3
                assert metric(text, "wsecho_max_active_objects") == 3
                assert metric(text, "wsecho_active_objects_over_limit_total") == 0


@pytest.mark.gen_test
async def test_an_evicted_object_wakes_with_its_storage_attachment_and_tags(tmp_path):
    async with (
        served(tmp_path, max_active_objects=1) as (server, recorder, _),
        rooms(server, "a", query="?tags=red,blue") as ws,
    ):
        assert await ask(ws["a"], "put k v1") == "a stored"
        assert await ask(ws["a"], "attach ann") == "a attached"
        async with rooms(server, "b"):
            assert state(server, "a") is HIBERNATING
            assert await ask(ws["a"], "get k") == "a v1"
            assert await ask(ws["a"], "whoami") == "a ann red,blue"
            assert state(server, "b") is HIBERNATING  # a woke, so b made room
        assert len(constructions(recorder, "a")) == 2


async def pin_with_plain_socket(server, gate, stack):
    ws = await stack.enter_async_context(connect(f"ws://127.0.0.1:{server.port}/p/ws?plain=1"))
    assert await ask(ws, "hi") == "p hi"

    async def release():
        await ws.close()
        await until(lambda: not server.runtime.find("ROOMS", "p").lifecycle.pins)

    return "a non-hibernatable WebSocket is open", release


async def pin_with_turn(server, gate, stack):
    (ws,) = (await stack.enter_async_context(rooms(server, "p"))).values()
    await ws.send("hold")
    await until(lambda: server.runtime.find("ROOMS", "p").lifecycle.current is not None)

    async def release():
        gate.set_result(None)
        assert await ws.recv() == "p held"

    return "its web_socket_message turn is running", release


async def pin_with_blocker(server, gate, stack):
    (ws,) = (await stack.enter_async_context(rooms(server, "p"))).values()
    assert await ask(ws, "block") == "p blocking"
    await until(lambda: server.runtime.find("ROOMS", "p").lifecycle.current is not None)

    async def release():
        gate.set_result(None)
        await until(lambda: server.runtime.find("ROOMS", "p").lifecycle.current is None)

    return "block_concurrency_while() is running", release


async def pin_with_wait_until(server, gate, stack):
    (ws,) = (await stack.enter_async_context(rooms(server, "p"))).values()
    assert await ask(ws, "later") == "p waiting"

    async def release():
        gate.set_result(None)
        await until(lambda: not server.runtime.find("ROOMS", "p").lifecycle.pins)

    return "wait_until() work is pending", release


@pytest.mark.parametrize("pin", [pin_with_plain_socket, pin_with_turn, pin_with_blocker, pin_with_wait_until])
@pytest.mark.gen_test
async def test_an_object_that_cannot_hibernate_is_never_evicted(tmp_path, caplog, pin):
    caplog.set_level(logging.WARNING, "wsecho")
    async with served(tmp_path, max_active_objects=1) as (server, _, gate), contextlib.AsyncExitStack() as stack:
        reason, release = await pin(server, gate, stack)
        async with rooms(server, "q") as ws:
            # Over the limit rather than refusing q's traffic: counted, logged, shown.
            assert state(server, "p") is ACTIVE
            assert server.runtime.active_count() == 2
            obj = await described(server, "p")
            assert (obj["evictable"], obj["cannot_hibernate_because"]) == (False, reason)
            assert (await described(server, "q"))["evictable"] is True
            text = await admin(server, "/metrics")
            assert metric(text, "wsecho_active_objects_over_limit_total") == 1
            assert metric(text, "wsecho_evictions_total", 'reason="limit"') == 0
            assert "over --max-active-objects 1: too few of them can hibernate now" in caplog.text
            await release()
            assert await ask(ws["q"], "again") == "q again"
            async with rooms(server, "r"):  # once released, p is the least recently used
                assert state(server, "p") is HIBERNATING
                assert server.runtime.stats.evictions["limit"] == 2  # p, then q for r


@pytest.mark.gen_test
async def test_an_object_kept_awake_is_evicted_only_after_every_other_idle_one(tmp_path):
    async with served(tmp_path, max_active_objects=2) as (server, _, gate), rooms(server, "a", "b") as ws:
        assert await ask(ws["a"], "awake") == "a awake"
        assert await ask(ws["b"], "again") == "b again"
        assert (await described(server, "a"))["kept_awake_for"] > 3500
        async with rooms(server, "c") as more:
            assert [state(server, n) for n in "abc"] == [ACTIVE, HIBERNATING, ACTIVE]
            await more["c"].send("hold")  # c cannot go: only a can
            await until(lambda: server.runtime.find("ROOMS", "c").lifecycle.current is not None)
            async with rooms(server, "d"):
                assert [state(server, n) for n in "acd"] == [HIBERNATING, ACTIVE, ACTIVE]
            gate.set_result(None)
            assert await more["c"].recv() == "c held"


# -- memory pressure ---------------------------------------------------------------------------


def fake_cgroup(tmp_path, current, limit=1_000_000, inactive_file=0):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir(exist_ok=True)
    (cgroup / "memory.max").write_text(f"{limit}\n")
    (cgroup / "memory.current").write_text(f"{current}\n")
    (cgroup / "memory.stat").write_text(f"anon 1\ninactive_file {inactive_file}\nactive_file 2\n")
    return cgroup


@pytest.mark.gen_test
async def test_memory_pressure_hibernates_the_least_recently_used_down_to_the_low_mark(tmp_path):
    cgroup = fake_cgroup(tmp_path, 100_000)  # the baseline: what the server holds without objects
    marks = {"memory_high": Mark(80, percent=True), "memory_low": Mark(70, percent=True)}
    async with served(tmp_path, memory_cgroup=str(cgroup), **marks) as (server, _, _):
        names = [f"r{i}" for i in range(10)]
        async with rooms(server, *names) as ws:
            assert await ask(ws["r0"], "again") == "r0 again"  # r1 is now the least recently used
            now = server.runtime.clock()
            assert server.memory.check(now) == 0  # 10% of memory.max: nothing to do
            fake_cgroup(tmp_path, 920_000, inactive_file=20_000)  # the page cache does not count
            # 800,000 bytes over the baseline in 10 objects: 3 of them free the 200,000 over 70%.
            assert server.memory.check(now + 1) == 3
            assert [n for n in names if state(server, n) is HIBERNATING] == ["r1", "r2", "r3"]
            text = await admin(server, "/metrics")
            assert metric(text, "wsecho_evictions_total", 'reason="memory"') == 3
            assert metric(text, "wsecho_memory_used_bytes", 'source="cgroup"') == 900_000
            assert metric(text, "wsecho_memory_high_bytes") == 800_000
            assert metric(text, "wsecho_memory_low_bytes") == 700_000
            assert metric(text, "wsecho_memory_cap_objects") == 7
            fake_cgroup(tmp_path, 750_000)  # under the high mark: nothing more goes ...
            assert server.memory.check(now + 2) == 0
            assert server.memory.check(now + 2.5) == 0  # (and it reads at most once a second)
            assert server.runtime.active_count() == 7
            # ... but until it is under the low mark, a wake hibernates the least recently used
            assert await ask(ws["r2"], "get nothing") == "r2 None"  # an evicted one wakes
            assert state(server, "r4") is HIBERNATING
            assert server.runtime.stats.evictions["memory"] == 4
            fake_cgroup(tmp_path, 650_000)
            assert server.memory.check(now + 3) == 0
            assert await ask(ws["r1"], "get nothing") == "r1 None"
            assert server.runtime.active_count() == 8  # the cap is gone
            assert metric(await admin(server, "/metrics"), "wsecho_memory_cap_objects") == 0


@pytest.mark.gen_test
async def test_the_sweeper_checks_the_memory_and_spares_what_cannot_hibernate(tmp_path):
    cgroup = fake_cgroup(tmp_path, 100_000)
    async with (
        served(tmp_path, sweeper=True, memory_cgroup=str(cgroup), memory_high=Mark(500_000)) as (server, _, gate),
        rooms(server, "a", "b", "c") as ws,
    ):
        await ws["a"].send("hold")
        await until(lambda: server.runtime.find("ROOMS", "a").lifecycle.current is not None)
        fake_cgroup(tmp_path, 990_000)
        await until(lambda: server.runtime.stats.evictions["memory"] == 2)
        assert [state(server, n) for n in "abc"] == [ACTIVE, HIBERNATING, HIBERNATING]
        gate.set_result(None)
        assert await ws["a"].recv() == "a held"


# -- reading the memory, and the options ---------------------------------------------------------


def fake_proc(tmp_path, cgroup_line="0::/system.slice/wsecho.service\n", resident_pages=1000):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "cgroup").write_text(cgroup_line)
    (proc / "self" / "statm").write_text(f"5000 {resident_pages} 300 1 0 2000 0\n")
    (proc / "meminfo").write_text("MemTotal:        2048 kB\nMemFree:         1024 kB\n")
    return proc


def test_the_reading_is_the_cgroups_working_set_else_the_rss(tmp_path):
    root = tmp_path / "cgroup-root"
    unit = root / "system.slice" / "wsecho.service"
    unit.mkdir(parents=True)
    proc = fake_proc(tmp_path)
    assert own_cgroup(proc, root) is None  # no memory controller there
    (unit / "memory.current").write_text("500000\n")
    (unit / "memory.max").write_text("max\n")
    assert own_cgroup(proc, root) == unit
    page = os.sysconf("SC_PAGE_SIZE")
    rss = MemoryReading(1000 * page, 2048 * 1024, "rss")  # a percentage is of MemTotal
    assert MemoryReader(unit, proc).read() == rss  # memory.max is "max": no limit to measure against
    (unit / "memory.max").write_text("800000\n")
    assert MemoryReader(unit, proc).read() == MemoryReading(500000, 800000, "cgroup")  # no memory.stat
    (unit / "memory.stat").write_text("anon 5\ninactive_file 100000\n")
    assert MemoryReader(unit, proc).read() == MemoryReading(400000, 800000, "cgroup")
    assert MemoryReader(None, proc).read() == rss
    # --workers 2, without a cgroup: each worker's percentages are of half the machine's memory
    assert MemoryReader(None, proc, share=2).read() == MemoryReading(1000 * page, 1024 * 1024, "rss")
    assert MemoryReader(unit, proc, share=2).read() == MemoryReading(400000, 800000, "cgroup")
    assert own_cgroup(fake_proc(tmp_path, "12:memory:/old\n"), root) is None  # cgroup v1 only


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], (Mark(80, percent=True), Mark(70, percent=True), 0)),
        (["--memory-high", "6GiB", "--memory-low", "off", "--max-active-objects", "50"], (Mark(6 * 1024**3), None, 50)),
        (["--memory-high", "off"], (None, Mark(70, percent=True), 0)),
        (["--memory-high", "90.5%", "--memory-low", "1024"], (Mark(90.5, percent=True), Mark(1024), 0)),
    ],
)
def test_memory_options(argv, expected):
    settings = settings_from(build_parser().parse_args(argv), {})
    assert (settings.memory_high, settings.memory_low, settings.max_active_objects) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory-high", "120%"], "--memory-high: must be a percentage from 0 to 100 (like 80%)"),
        (["--memory-low", "lots"], "--memory-low: must be a percentage (like 80%), a number of bytes"),
        (["--memory-high", "60%"], "--memory-low: 70% is above --memory-high 60%"),
        (["--memory-high", "1MiB", "--memory-low", "2MiB"], "--memory-low: 2097152 bytes is above --memory-high"),
        (["--max-active-objects", "-1"], "--max-active-objects: must be 0 or more, got -1"),
    ],
)
def test_bad_memory_options_name_the_option_and_the_value(argv, message):
    with pytest.raises(ConfigError) as info:
        settings_from(build_parser().parse_args(argv), {})
    assert message in str(info.value)


def test_a_memory_cgroup_that_is_not_one_is_refused(tmp_path):
    settings = Settings(data_dir=":memory:", memory_cgroup=str(tmp_path))
    with pytest.raises(ConfigError, match=r"has no memory\.current: not a cgroup v2 directory"):
        Server(memory_app(Recorder(), None), settings)


def test_help_shows_the_percentage_defaults():
    # argparse formats help with %: a bare "80%" in it made --help raise
    assert "(env WSECHO_MEMORY_HIGH; default 80%)" in " ".join(build_parser().format_help().split())


@pytest.mark.gen_test
async def test_a_mounted_app_is_bounded_like_the_standalone_server(tmp_path):
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    from wsecho.tornado import Mount

    gate = asyncio.get_running_loop().create_future()
    gate.set_result(None)
    mount = Mount(memory_app(Recorder(), gate), data_dir=str(tmp_path / "d"), max_active_objects=1, memory_low="60%")
    assert mount.memory is not None  # memory pressure is on by default, as in the standalone server
    assert mount.memory.policy.marks(MemoryReading(0, 1000, "rss")) == (800, 600)
    [listener] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    http = tornado.httpserver.HTTPServer(tornado.web.Application(mount.routes()))
    http.add_sockets([listener])
    await mount.start()
    try:
        port = listener.getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/a/ws") as a, connect(f"ws://127.0.0.1:{port}/b/ws") as b:
            assert await ask(a, "put k v1") == "a stored"
            assert await ask(b, "hi") == "b hi"
            assert mount.runtime.find("ROOMS", "a").lifecycle.state is HIBERNATING  # b made room
            assert await ask(a, "get k") == "a v1"
            # b's upgrade, a's put, b's hi and a's get: each woke its room and hibernated the other
            assert mount.runtime.stats.evictions["limit"] == 4
    finally:
        http.stop()
        await mount.stop()
    assert Mount(memory_app(Recorder(), gate), data_dir=":memory:", memory_high="off").memory is None
    with pytest.raises(ValueError, match=r"Mount\(memory_low=...\) must be a percentage .* got 'lots'"):
        Mount(memory_app(Recorder(), gate), data_dir=":memory:", memory_low="lots")
