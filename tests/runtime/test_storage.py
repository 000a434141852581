"""The storage contract through the runtime, run against every backend, plus alarms, the output gate and restarts."""

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from tests.apps.store import store_app
from tests.helpers import until
from wsecho import InvalidArgumentError, Limits, QuotaExceededError, StorageError
from wsecho.api import codec
from wsecho.api.ids import DurableObjectId
from wsecho.api.storage import CACHE_ENTRIES, DurableObjectStorage
from wsecho.backends.base import DB_FILE, MemoryBackend, SQLiteBackend, entry_bytes, migrations
from wsecho.backends.postgres import PostgresBackend
from wsecho.core.alarms import MAX_RETRIES, retry_delay_ms
from wsecho.runtime.host import PIN_STORAGE
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend_factory(request, tmp_path):
    """Makes the backend under test; for SQLite and PostgreSQL, each call opens the same data."""
    if request.param == "memory":
        shared = MemoryBackend()
        return lambda: shared
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda: PostgresBackend(url)
    return lambda: SQLiteBackend(tmp_path / "data")


@pytest.fixture
def flags():
    return {}


@pytest.fixture
def make_runtime(backend_factory, recorder, flags):
    """Starts a runtime on the backend under test; the test closes what it starts."""

    async def make(limits=None):
        clock = FakeClock(start=NOW)
        rt = Runtime(
            store_app(recorder, flags),
            clock=clock.monotonic,
            wall_clock=clock.now,
            backend=backend_factory(),
            limits=limits,
        )
        await rt.start()
        return rt

    return make


@pytest.fixture
def rt(make_runtime, io_loop):
    runtime = io_loop.run_sync(make_runtime)
    yield runtime
    io_loop.run_sync(runtime.close)


def stub(runtime, name="s"):
    return runtime.env.STORE.get_by_name(name)


# -- the contract -------------------------------------------------------------------------------

VALUES = [
    True,
    0,
    -(2**62),
    1.5,
    "",
    "héllo ✓",
    b"\x00\xffraw",
    [1, "two", None, [3.0]],
    {"a": {"b": [1, 2]}, "$weird": b"bytes inside", "$b": "not bytes"},
    {"$b": "AAAA"},
    {"$d": 1},
]


@pytest.mark.gen_test
async def test_values_round_trip(rt):
    s = stub(rt)
    for i, value in enumerate(VALUES):
        await s.do("put", f"k{i}", value)
    for i, value in enumerate(VALUES):
        assert await s.do("get", f"k{i}") == value
    assert await s.do("get", ("t",)) == {}
    await s.do("put", "t", (1, 2))
    assert await s.do("get", "t") == [1, 2]


@pytest.mark.gen_test
async def test_sql_on_a_key_value_class_is_refused_naming_the_setting(rt):
    assert await stub(rt).sql_calls() == [
        'ctx.storage.sql needs SQL storage: set storage = "sql" on STORE\'s class',
        'transaction_sync() needs SQL storage: set storage = "sql" on STORE\'s class',
    ]


@pytest.mark.gen_test
async def test_get_put_delete_many(rt):
    s = stub(rt)
    assert await s.do("get", "missing") is None
    await s.do("put", {"a": 1, "b": 2, "c": 3})
    assert await s.do("get", ["c", "zz", "a"]) == {"c": 3, "a": 1}
    assert await s.do("delete", "a") is True
    assert await s.do("delete", "a") is False
    assert await s.do("delete", ["b", "c", "nope"]) == 2
    assert await s.do("list") == {}


@pytest.mark.gen_test
async def test_list_orders_filters_and_limits(rt):
    s = stub(rt)
    keys = ["a", "b", "ba", "bb", "bc", "c", "é", "z"]
    await s.do("put", {k: k.upper() for k in keys})
    assert list(await s.do("list")) == sorted(keys)
    assert list(await s.do("list", prefix="b")) == ["b", "ba", "bb", "bc"]
    assert list(await s.do("list", start="b", end="c")) == ["b", "ba", "bb", "bc"]
    assert list(await s.do("list", start="bb")) == ["bb", "bc", "c", "z", "é"]
    assert list(await s.do("list", limit=3, reverse=True)) == ["é", "z", "c"]
    assert list(await s.do("list", prefix="b", limit=2, reverse=True)) == ["bc", "bb"]
    assert list(await s.do("list", prefix="b", start="bb")) == ["bb", "bc"]
    assert (await s.do("list", prefix="ba")) == {"ba": "BA"}


@pytest.mark.gen_test
async def test_reads_see_uncommitted_writes_of_the_same_turn(rt):
    s = stub(rt)
    await s.do("put", {"a": 1, "b": 2, "c": 3})
    results = await s.script(
        [
            ("put", ("d", 4), {}),
            ("delete", ("a",), {}),
            ("get", (["a", "d"],), {}),
            ("list", (), {"limit": 2}),
            ("delete_all", (), {}),
            ("put", ("x", 9), {}),
            ("list", (), {}),
            ("get", ("b",), {}),
        ]
    )
    assert results == [None, True, {"d": 4}, {"b": 2, "c": 3}, None, None, {"x": 9}, None]
    assert await s.do("list") == {"x": 9}


@pytest.mark.gen_test
async def test_transactions_are_all_or_nothing(rt):
    s = stub(rt)
    await s.do("put", "keep", 1)
    assert await s.txn({"a": 1, "b": 2}) == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="transaction body failed"):
        await s.txn({"c": 3, "keep": 99}, fail=True)
    assert await s.txn({"d": 4}, rollback=True) == {"d": 4}
    assert await s.do("list") == {"a": 1, "b": 2, "keep": 1}


@pytest.mark.gen_test
async def test_a_handler_that_raises_after_writing_still_commits(rt):
    # Like Cloudflare: a write that returned stays; use transaction() to undo on error.
    s = stub(rt)
    with pytest.raises(RuntimeError, match="failed after writing"):
        await s.put_then_fail("k", "v")
    assert await s.do("get", "k") == "v"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("k" * 2049, 1),
            "storage key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'… is 2049 UTF-8 bytes; the limit is 2048",
        ),
        (("k", "x" * (128 * 1024)), "bytes encoded; the limit is 131072"),
        ((5, 1), "put() takes a str key and a value, or a dict, not int"),
        (({5: 1},), "storage keys must be str, got int"),
        (("k", None), "None cannot be stored"),
        (("k", {1: 2}), "dict keys must be str"),
        (("k", float("inf")), "must be finite"),
        (("k", object()), "cannot store a object"),
        (({f"k{i}": i for i in range(129)},), "put() of 129 keys; the limit is 128"),
        (("k",), "put(key, value) needs a value; put(entries) takes a dict"),
        (({"k": 1}, 2), "put(entries) takes a dict and no value"),
        # red team L6: a lone surrogate was a UnicodeEncodeError with a traceback
        (("k", "a\ud800"), "a stored string contains a lone surrogate (\\ud800 at index"),
        (("k\udfff", 1), "a storage key contains a lone surrogate (\\udfff at index 1)"),
    ],
)
@pytest.mark.gen_test
async def test_limits_and_bad_values_raise_clear_errors(rt, args, message):
    with pytest.raises(InvalidArgumentError) as info:
        await stub(rt).do("put", *args)
    assert message in str(info.value)
    assert await stub(rt).do("list") == {}


@pytest.mark.gen_test
async def test_values_are_copies(rt):
    s = stub(rt)
    await s.do("put", "d", {"list": [1]})
    got = await s.do("get", "d")
    got["list"].append(2)
    assert await s.do("get", "d") == {"list": [1]}


@pytest.mark.gen_test
async def test_objects_have_separate_namespaces(rt):
    await stub(rt, "one").do("put", "k", 1)
    await stub(rt, "two").do("put", "k", 2)
    await stub(rt, "two").do("delete_all")
    assert await stub(rt, "one").do("get", "k") == 1
    assert await stub(rt, "two").do("get", "k") is None


@pytest.mark.gen_test
async def test_data_survives_hibernation(rt, recorder):
    s = stub(rt)
    await s.do("put", "k", "v")
    host = rt.find("STORE", "s")
    assert rt.sweep(now=rt.clock() + 10) == 1
    assert host.storage is None  # the cache went with the instance
    assert await s.do("get", "k") == "v"
    assert len(recorder.of("constructor")) == 2


@pytest.mark.gen_test
async def test_data_and_alarms_survive_a_restart(make_runtime, backend_factory, recorder):
    first = await make_runtime()
    await stub(first).do("put", "k", "v")
    await stub(first).do("set_alarm", NOW_MS + 60_000)
    await first.close()
    second = await make_runtime()
    try:
        assert await stub(second).do("get", "k") == "v"
        assert await stub(second).do("get_alarm") == NOW_MS + 60_000
        # missed while down: it fires after the start
        assert second.fire_due_alarms(NOW_MS + 60_000) == 1
        await recorder.wait_for(lambda r: r.of("alarm"))
    finally:
        await second.close()


# -- alarms ---------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_alarm_api(rt):
    s = stub(rt)
    assert await s.do("get_alarm") is None
    await s.do("set_alarm", NOW + timedelta(seconds=5))
    assert await s.do("get_alarm") == NOW_MS + 5000
    await s.do("set_alarm", NOW_MS + 7000)  # one per object: this replaces it
    assert await s.do("get_alarm") == NOW_MS + 7000
    await s.do("delete_alarm")
    assert await s.do("get_alarm") is None
    with pytest.raises(InvalidArgumentError, match="aware datetime"):
        await s.do("set_alarm", datetime(2026, 1, 1))
    with pytest.raises(InvalidArgumentError, match="datetime or epoch milliseconds"):
        await s.do("set_alarm", "soon")


@pytest.mark.gen_test
async def test_a_due_alarm_wakes_a_hibernated_object(rt, recorder):
    s = stub(rt)
    await s.do("set_alarm", NOW_MS + 1000)
    assert rt.sweep(now=rt.clock() + 10) == 1
    # hibernated with no sockets: nothing of it is left in memory but its alarm
    assert rt.find("STORE", "s") is None
    assert rt.fire_due_alarms(NOW_MS + 999) == 0
    assert rt.fire_due_alarms(NOW_MS + 1000) == 1
    await recorder.wait_for(lambda r: r.of("alarm"))
    assert recorder.of("alarm") == [("alarm", "s", 0, False)]
    assert len(recorder.of("constructor")) == 2
    # spent: deleted together with the handler's own write
    await until(lambda: rt.find("STORE", "s").lifecycle.current is None)
    assert await s.do("get_alarm") is None
    assert await s.do("get", "alarm-ran") == 0


@pytest.mark.gen_test
async def test_an_alarm_does_not_keep_its_object_awake(rt):
    s = stub(rt)
    await s.do("set_alarm", NOW_MS + 3_600_000)
    assert rt.find("STORE", "s").lifecycle.hibernation_blocker() is None
    assert rt.sweep(now=rt.clock() + 10) == 1


@pytest.mark.gen_test
async def test_an_alarm_set_by_alarm_replaces_it(rt, recorder, flags):
    flags["alarm_again"] = NOW_MS + 50_000
    s = stub(rt)
    await s.do("set_alarm", NOW_MS)
    rt.fire_due_alarms(NOW_MS)
    await recorder.wait_for(lambda r: r.of("alarm"))
    await until(lambda: rt.alarms.get("STORE:" + str(rt.env.STORE.id_from_name("s"))) == NOW_MS + 50_000)
    assert await s.do("get_alarm") == NOW_MS + 50_000


@pytest.mark.gen_test
async def test_a_failing_alarm_is_retried_with_backoff_then_given_up(rt, recorder, flags):
    flags["alarm_fails"] = True
    s = stub(rt)
    await s.do("set_alarm", NOW_MS)
    obj = "STORE:" + str(rt.env.STORE.id_from_name("s"))
    now = NOW_MS
    for attempt in range(MAX_RETRIES + 1):
        assert rt.fire_due_alarms(now) == 1
        await recorder.wait_for(lambda r, n=attempt: len(r.of("alarm")) == n + 1)
        await until(lambda: rt.find("STORE", "s").lifecycle.current is None)
        if attempt < MAX_RETRIES:
            assert rt.alarms.get(obj) == NOW_MS + retry_delay_ms(attempt + 1)
            now = rt.alarms.get(obj)
    assert [e[2:] for e in recorder.of("alarm")] == [(0, False)] + [(n, True) for n in range(1, MAX_RETRIES + 1)]
    assert rt.stats.alarms_given_up == 1
    assert rt.alarms.get(obj) is None
    await rt.committer.idle()
    assert await s.do("get_alarm") is None


def test_retry_bounds():
    assert [retry_delay_ms(n) for n in range(1, MAX_RETRIES + 1)] == [2000, 4000, 8000, 16000, 32000, 64000]


# -- usage and quotas (red team M4) -------------------------------------------------------------


async def stored_bytes(rt, name="s"):
    """What the object really stores, counted from its rows."""
    rows = await stub(rt, name).do("list")
    from wsecho.api import codec

    return sum(entry_bytes(k, codec.encode(v)) for k, v in rows.items())


@pytest.mark.gen_test
async def test_usage_is_kept_exactly_through_every_kind_of_write(rt):
    s, obj = stub(rt), "STORE:" + rt.env.STORE.id_from_name("s").hex
    await s.do("put", {"a": "x" * 100, "é": [1, 2], "c": b"\0" * 50})
    await s.do("put", "a", "short")  # an overwrite of a value it never read
    await s.do("delete", ["c", "missing"])
    await s.script([("put", ("d", "y" * 300), {}), ("delete_all", (), {}), ("put", ("e", 7), {})])
    await s.txn({"f": "z" * 40}, rollback=True)
    await stub(rt, "other").do("put", "k", "v" * 10)
    assert await rt.backend.usage(obj) == await stored_bytes(rt) == entry_bytes("e", b"j7")
    assert (
        rt.committer.stored_bytes
        == await rt.backend.usage(None)
        == await stored_bytes(rt) + await stored_bytes(rt, "other")
    )


@pytest.mark.gen_test
async def test_an_object_over_its_quota_is_refused_and_nothing_of_the_call_is_stored(make_runtime):
    rt = await make_runtime(Limits(object_storage_bytes=1000))
    try:
        s = stub(rt)
        await s.do("put", "a", "x" * 600)
        with pytest.raises(QuotaExceededError) as info:
            await s.do("put", {"b": "y" * 600, "c": 1})
        assert "this object would store 1,2" in str(info.value)
        assert "its quota is 1,000 (--max-object-storage)" in str(info.value)
        assert await s.do("get", ["b", "c"]) == {}
        # a known overwrite counts only what it adds; a delete makes room
        assert await s.script([("get", ("a",), {}), ("put", ("a", "z" * 900), {})]) == ["x" * 600, None]
        await s.do("delete", "a")
        await s.do("put", "b", "y" * 900)
        assert rt.stats.quota_refusals["object"] == 1
        # a refused write in a handler does not reset the object
        assert rt.stats.snapshot().resets == 0
    finally:
        await rt.close()


@pytest.mark.gen_test
async def test_all_objects_together_are_held_to_the_total_quota(make_runtime):
    rt = await make_runtime(Limits(storage_bytes=1500))
    try:
        await stub(rt, "a").do("put", "k", "x" * 1000)
        with pytest.raises(QuotaExceededError, match=r"all objects would store 1,[0-9]{3} bytes; the quota is 1,500"):
            await stub(rt, "b").do("put", "k", "y" * 600)
        await stub(rt, "b").do("put", "k", "y" * 100)
        assert rt.stats.quota_refusals["total"] == 1
    finally:
        await rt.close()
    # the total is read back from storage at the next start
    rt = await make_runtime(Limits(storage_bytes=1500))
    try:
        assert rt.committer.stored_bytes == await stored_bytes(rt, "a") + await stored_bytes(rt, "b")
        with pytest.raises(QuotaExceededError):
            await stub(rt, "c").do("put", "k", "z" * 600)
    finally:
        await rt.close()


@pytest.mark.gen_test
async def test_the_usage_table_is_filled_from_a_version_1_database(tmp_path):
    (tmp_path / "d").mkdir()
    db = sqlite3.connect(tmp_path / "d" / DB_FILE)
    version, _, sql = migrations()[0]
    db.executescript(sql)
    db.executemany("INSERT INTO kv VALUES (?, ?, ?)", [("o:1", "ké", b"j1"), ("o:1", "b", b"jxyz"), ("o:2", "c", b"b")])
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    backend = SQLiteBackend(tmp_path / "d")
    await backend.open()
    try:
        assert await backend.usage("o:1") == 3 + 2 + 1 + 4
        assert await backend.usage("o:2") == 2
        assert await backend.usage(None) == 12
        assert await backend.usage("o:3") == 0
    finally:
        await backend.close()


# -- SQLite specifics -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_sqlite_schema_version_wal_and_lock(tmp_path):
    backend = SQLiteBackend(tmp_path / "d")
    await backend.open()
    try:
        db = sqlite3.connect(tmp_path / "d" / DB_FILE)
        assert db.execute("PRAGMA user_version").fetchone() == (migrations()[-1][0],)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.close()
        with pytest.raises(StorageError, match="in use by another wsecho process"):
            await SQLiteBackend(tmp_path / "d").open()
    finally:
        await backend.close()


@pytest.mark.gen_test
async def test_sqlite_refuses_a_newer_schema(tmp_path):
    (tmp_path / "d").mkdir()
    db = sqlite3.connect(tmp_path / "d" / DB_FILE)
    db.execute("PRAGMA user_version = 99")
    db.close()
    backend = SQLiteBackend(tmp_path / "d")
    with pytest.raises(StorageError, match="schema version 99, newer than this wsecho knows"):
        await backend.open()
    await backend.close()


# -- the output gate --------------------------------------------------------------------------


class GatedBackend(MemoryBackend):
    """Commits wait until the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0
        self.fail = False

    async def commit(self, batches):
        self.waiting += 1
        await self.gate.wait()
        if self.fail:
            raise StorageError("disk on fire")
        return await super().commit(batches)


@pytest.mark.gen_test
async def test_outputs_wait_until_the_writes_are_durable(recorder, flags):
    from websockets.asyncio.client import connect

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    backend = GatedBackend()
    server = Server(store_app(recorder, flags), Settings(port=0), backend=backend)
    await server.start()
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/g/ws") as ws:
            await ws.send("put k v")
            await until(lambda: backend.waiting == 1)
            host = server.runtime.find("STORE", "g")
            # the answer is written but held back, and the object cannot hibernate
            assert [frame for _, frame in host.gate] == ["ok k"]
            assert host.lifecycle.hibernation_blocker() == "an event is being handled"
            assert backend.data == {}
            backend.gate.set()
            assert await ws.recv() == "ok k"
            assert list(backend.data.values()) == [{"k": b'j"v"'}]
            assert PIN_STORAGE not in host.lifecycle.pins
    finally:
        await server.stop()


@pytest.mark.gen_test
async def test_on_postgres_outputs_wait_until_the_transaction_commits(recorder, flags, postgres_url):
    # The fencing hook holds the commit's transaction open, as a slow server would.
    import psycopg
    from websockets.asyncio.client import connect

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    gate, held = asyncio.Event(), asyncio.Event()

    async def fence(conn, batches):
        held.set()
        await gate.wait()

    def stored():
        with psycopg.connect(postgres_url) as conn:
            return [bytes(v) for (v,) in conn.execute("SELECT value FROM kv")]

    server = Server(store_app(recorder, flags), Settings(port=0), backend=PostgresBackend(postgres_url, fence=fence))
    await server.start()
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/g/ws") as ws:
            await ws.send("put k v")
            await asyncio.wait_for(held.wait(), 10)
            host = server.runtime.find("STORE", "g")
            assert [frame for _, frame in host.gate] == ["ok k"]  # written, held back
            assert await asyncio.to_thread(stored) == []
            gate.set()
            assert await asyncio.wait_for(ws.recv(), 10) == "ok k"
            assert await asyncio.to_thread(stored) == [b'j"v"']
    finally:
        await server.stop()


@pytest.mark.gen_test
async def test_a_failed_commit_discards_outputs_and_resets_the_object(recorder, flags):
    from websockets.asyncio.client import connect

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    backend = GatedBackend()
    backend.fail = True
    backend.gate.set()
    server = Server(store_app(recorder, flags), Settings(port=0), backend=backend)
    await server.start()
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/f/ws") as ws:
            await ws.send("put k v")
            await ws.wait_closed()
            assert ws.close_code == 1011
        assert server.runtime.stats.storage_errors >= 1
        assert server.runtime.stats.snapshot().resets == 1
    finally:
        await server.stop()


@pytest.mark.gen_test
async def test_concurrent_commits_share_a_transaction(rt):
    stubs = [stub(rt, f"o{i}") for i in range(20)]
    await asyncio.gather(*(s.do("put", "k", i) for i, s in enumerate(stubs)))
    assert rt.committer.batches == 20
    assert rt.committer.commits < 20
    assert [await s.do("get", "k") for s in stubs] == list(range(20))


@pytest.mark.gen_test
async def test_a_real_client_sees_its_data_after_a_hibernation(recorder, flags, tmp_path, io_loop):
    from websockets.asyncio.client import connect

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    server = Server(store_app(recorder, flags), Settings(port=0, data_dir=str(tmp_path / "d")))
    await server.start()
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/h/ws") as ws:
            await ws.send("put color blue")
            assert await ws.recv() == "ok color"
            assert server.runtime.sweep(now=io_loop.time() + 60) == 1
            await ws.send("get color")
            assert await ws.recv() == "'blue'"
            assert len(recorder.of("constructor")) == 2
    finally:
        await server.stop()


class FailingBackend(MemoryBackend):
    """Commits fail with ``OSError(ENOSPC)`` once ``fail_from`` commits have succeeded."""

    def __init__(self, fail_from):
        super().__init__()
        self.fail_from = fail_from

    async def commit(self, batches):
        if self.commits >= self.fail_from:
            raise OSError(28, "No space left on device")
        return await super().commit(batches)


@pytest.mark.gen_test
async def test_a_failed_commit_never_releases_what_it_held_back(recorder, flags):
    # Red team H1: the frames held for a failed batch were sent before the 1011.
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    backend = FailingBackend(fail_from=1)
    server = Server(store_app(recorder, flags), Settings(port=0), backend=backend)
    await server.start()
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/h1/ws") as ws:
            await ws.send("put a 1")
            assert await asyncio.wait_for(ws.recv(), 5) == "ok a"
            await ws.send("put b 2")
            # "ok b" was never durable, so it is never sent: the next thing is the Close.
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1011
        assert backend.data == {"STORE:" + server.runtime.find("STORE", "h1").id.hex: {"a": b'j"1"'}}
        assert server.runtime.stats.storage_errors == 1
    finally:
        await server.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (root only): a real filesystem that runs full."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.gen_test(timeout=30)
async def test_a_full_disk_loses_no_acknowledged_write_and_makes_the_server_unready(recorder, flags, tiny_disk, caplog):
    # Red team H1 and L1 with a real filesystem running full under SQLite.
    from tornado.httpclient import AsyncHTTPClient
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 256 * 1024)  # freed later, to see the server recover
    server = Server(store_app(recorder, flags), Settings(port=0, admin_port=0, data_dir=str(tiny_disk / "d")))
    server.runtime.storage_probe_interval = 0.05
    await server.start()
    acknowledged, sent = [], 0
    http = AsyncHTTPClient()

    async def readyz():
        return await http.fetch(f"http://127.0.0.1:{server.admin_port}/readyz", raise_error=False)

    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/disk/ws", max_size=None) as ws:
            with contextlib.suppress(ConnectionClosed):
                for sent in range(1, 200):  # 200 × 40 KB is four times the disk
                    await ws.send(f"put k{sent} {'x' * 40_000}")
                    acknowledged.append((await asyncio.wait_for(ws.recv(), 10)).split()[1])
            assert ws.close_code == 1011
        assert 0 < len(acknowledged) < sent
        answer = await readyz()
        assert answer.code == 503
        assert b"storage failing:" in answer.body
        assert b"database or disk is full" in answer.body
        assert "cannot rollback" not in caplog.text
        filler.unlink()
        await until(lambda: server.runtime.storage_failure() is None, timeout=10)
        assert (await readyz()).code == 200
    finally:
        await server.stop()
    conn = sqlite3.connect(tiny_disk / "d" / DB_FILE)
    stored = {key for (key,) in conn.execute("SELECT key FROM kv")}
    conn.close()
    assert set(acknowledged) <= stored  # every write a client was told about is on disk
    assert f"k{sent}" not in stored


@pytest.mark.gen_test(timeout=60)
async def test_postgres_going_away_fails_the_turn_makes_the_server_unready_and_recovers(recorder, flags, own_postgres):
    # pg_ctl stop -m immediate: the server ends every connection at once, as a crash would.
    from tornado.httpclient import AsyncHTTPClient
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    url = own_postgres.fresh_url()
    server = Server(store_app(recorder, flags), Settings(port=0, admin_port=0, storage=url))
    server.runtime.storage_probe_interval = 0.05
    await server.start()
    http = AsyncHTTPClient()

    async def readyz():
        return await http.fetch(f"http://127.0.0.1:{server.admin_port}/readyz", raise_error=False)

    try:
        async with connect(f"ws://127.0.0.1:{server.port}/store/pg/ws") as ws:
            await ws.send("put before 1")
            assert await asyncio.wait_for(ws.recv(), 10) == "ok before"
            await asyncio.to_thread(own_postgres.stop, "immediate")
            await ws.send("put during 2")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 20)
            assert ws.close_code == 1011
        answer = await readyz()
        assert answer.code == 503
        assert b"storage failing: writing to the PostgreSQL database postgresql://wsecho@127.0.0.1:" in answer.body
        await asyncio.to_thread(own_postgres.start)
        await until(lambda: server.runtime.storage_failure() is None, timeout=30)
        assert (await readyz()).code == 200
        async with connect(f"ws://127.0.0.1:{server.port}/store/pg/ws") as ws:
            await ws.send("get before")
            assert await asyncio.wait_for(ws.recv(), 10) == "'1'"
            await ws.send("get during")
            assert await asyncio.wait_for(ws.recv(), 10) == "None"  # never acknowledged, never stored
    finally:
        await server.stop()


@pytest.mark.gen_test
async def test_a_nested_transaction_rolls_back_alone_and_a_finished_one_refuses_use(rt):
    s = stub(rt, "n1")
    assert await s.nested(True) == "InvalidStateError: this transaction is over; use ctx.storage"
    assert await s.do("list") == {"outer": 1}  # the inner rollback undid only the inner write
    s2 = stub(rt, "n2")
    await s2.nested(False)
    assert await s2.do("list") == {"inner": 1, "outer": 1}


@pytest.mark.gen_test
async def test_delete_all_in_a_rolled_back_transaction_deletes_nothing(rt):
    s = stub(rt, "d")
    assert await s.delete_all_rolled_back() == {"a": 1}
    assert await s.do("list") == {"a": 1}


@pytest.mark.gen_test
async def test_a_committed_batch_leaves_nothing_in_flight(rt):
    s = stub(rt, "f")
    await s.do("put", "k", 1)
    await rt.barrier(rt.find("STORE", "f"))
    storage = rt.find("STORE", "f").storage
    assert not storage.in_flight()
    assert not storage.busy()  # so the output gate opens and the object may hibernate


# -- writes outside a turn, the quota's view of a turn, sync, the cache (issue 20) ----------------


async def durable(rt, name, keys):
    """What the backend holds for object ``name``: what a crash now would keep."""
    rows = await rt.backend.read("STORE:" + rt.env.STORE.id_from_name(name).hex, keys)
    return {key: codec.decode(value) for key, value in rows.items()}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix": 5}, "storage keys must be str, got int"),
        ({"end": "k" * 2049}, "is 2049 UTF-8 bytes; the limit is 2048"),
        ({"limit": 0}, "limit must be a positive integer, got 0"),
        ({"limit": True}, "limit must be a positive integer, got True"),
        ({"limit": "3"}, "limit must be a positive integer, got '3'"),
    ],
)
@pytest.mark.gen_test
async def test_list_refuses_bad_bounds_and_limits_with_clear_errors(rt, options, message):
    with pytest.raises(InvalidArgumentError) as info:
        await stub(rt).do("list", **options)
    assert message in str(info.value)


@pytest.mark.gen_test
async def test_list_by_a_prefix_that_ends_in_the_last_code_point(rt):
    s = stub(rt)
    await s.do("put", {"a\U0010ffff": 1, "a\U0010ffffz": 2, "b": 3, "a": 4})
    assert await s.do("list", prefix="a\U0010ffff") == {"a\U0010ffff": 1, "a\U0010ffffz": 2}
    assert await s.do("list", prefix="a\U0010ffff", limit=1, reverse=True) == {"a\U0010ffffz": 2}
    assert await s.do("list", prefix="\U0010ffff") == {}


@pytest.mark.gen_test
async def test_list_by_prefix_with_a_limit_skips_the_keys_before_the_prefix(rt):
    s = stub(rt)
    await s.do("put", {"a1": 1, "a2": 2, "b1": 3, "b2": 4, "c1": 5})
    assert await s.do("list", prefix="b", limit=1) == {"b1": 3}
    assert await s.do("list", prefix="b", limit=1, reverse=True) == {"b2": 4}
    assert await s.do("list", prefix="b", end="z", limit=1, reverse=True) == {"b2": 4}
    assert await s.do("list", prefix="\U0010ffff", end="z") == {}
    await s.do("put", {"a\U0010fffe1": 6, "a\U0010ffff": 7})
    assert await s.do("list", prefix="a\U0010fffe", limit=1, reverse=True) == {"a\U0010fffe1": 6}
    # a deletion of this turn hides a row: list() asks the backend for one more
    assert (await s.script([("delete", ("a1",), {}), ("list", (), {"limit": 1})]))[-1] == {"a2": 2}
    # the turn's own writes outside the range are not listed either
    steps = [("put", ("zz", 8), {}), ("put", ("b0", 9), {}), ("list", (), {"start": "b", "end": "b2"})]
    assert (await s.script(steps))[-1] == {"b0": 9, "b1": 3}


@pytest.mark.parametrize("how", ["put", "after delete_all", "after a rollback"])
@pytest.mark.parametrize("quota_off_by", [0, -1])
@pytest.mark.gen_test
async def test_an_object_quota_alone_is_enforced_to_the_byte(make_runtime, quota_off_by, how):
    # A put of exactly the quota passes, one byte more is refused: alone, and in a turn that
    # first cleared everything or rolled back a transaction (both count from nothing).
    size = entry_bytes("a", codec.encode("x" * 600))
    rt = await make_runtime(Limits(object_storage_bytes=size + quota_off_by, storage_bytes=None))
    s = stub(rt, how)
    try:
        with pytest.raises(QuotaExceededError) if quota_off_by else contextlib.nullcontext():
            if how == "put":
                await s.do("put", "a", "x" * 600)
            elif how == "after delete_all":
                await s.script([("delete_all", (), {}), ("put", ("a", "x" * 600), {})])
            else:
                await s.rollback_then_put("a", "x" * 600)
    finally:
        await rt.close()


@pytest.mark.gen_test
async def test_an_overwrite_one_byte_longer_at_the_quota_is_refused(make_runtime):
    size = entry_bytes("a", codec.encode("x" * 600))
    assert entry_bytes("a", codec.encode("x" * 601)) == size + 1
    rt = await make_runtime(Limits(object_storage_bytes=size, storage_bytes=None))
    try:
        await stub(rt).do("put", "a", "x" * 600)
        with pytest.raises(QuotaExceededError):
            await stub(rt).do("put", "a", "x" * 601)
    finally:
        await rt.close()


@pytest.mark.gen_test
async def test_an_object_over_a_lowered_quota_may_still_overwrite_without_growing(make_runtime):
    # The quota was lowered across a restart below what the object stores: writes that do not
    # grow it pass (so it can still change its data, or make room); a write that grows it is refused.
    first = await make_runtime(Limits(object_storage_bytes=None, storage_bytes=None))
    try:
        await stub(first).do("put", "a", "x" * 600)
    finally:
        await first.close()
    size = entry_bytes("a", codec.encode("x" * 600))
    rt = await make_runtime(Limits(object_storage_bytes=size // 2, storage_bytes=None))
    try:
        steps = [("get", ("a",), {}), ("put", ("a", "y" * 600), {})]
        assert await stub(rt).script(steps) == ["x" * 600, None]
        with pytest.raises(QuotaExceededError):
            await stub(rt).do("put", "a", "y" * 601)
        assert await stub(rt).do("get", "a") == "y" * 600
    finally:
        await rt.close()


@pytest.mark.gen_test
async def test_a_spent_alarm_does_not_fire_again_after_a_restart(make_runtime, recorder):
    first = await make_runtime()
    await stub(first).do("set_alarm", NOW_MS + 1000)
    assert first.fire_due_alarms(NOW_MS + 1000) == 1
    await recorder.wait_for(lambda r: r.of("alarm"))
    await until(lambda: first.find("STORE", "s").lifecycle.current is None)
    await first.close()
    second = await make_runtime()
    try:
        assert await stub(second).do("get_alarm") is None
        assert second.fire_due_alarms(NOW_MS + 10_000) == 0
    finally:
        await second.close()


@pytest.mark.gen_test
async def test_a_write_outside_a_turn_commits_on_its_own(rt, flags):
    loop = asyncio.get_running_loop()
    flags["gate"], flags["written"] = loop.create_future(), loop.create_future()
    await stub(rt, "later").write_later({"a": 1})
    before = rt.committer.commits
    flags["gate"].set_result(None)  # the wait_until task writes now, with no turn running
    await asyncio.wait_for(flags["written"], 5)
    await until(lambda: rt.committer.commits > before)
    await rt.committer.idle()
    assert await durable(rt, "later", ["a"]) == {"a": 1}


@pytest.mark.parametrize("ending", ["commit", "rollback"])
@pytest.mark.gen_test
async def test_a_transaction_outside_a_turn_commits_when_it_ends_and_never_before(rt, flags, ending):
    loop = asyncio.get_running_loop()
    flags["gate"], flags["written"] = loop.create_future(), loop.create_future()
    await stub(rt, "later").write_later({"a": 1}, transaction=ending)
    before = rt.committer.commits
    flags["gate"].set_result(None)
    await asyncio.wait_for(flags["written"], 5)
    if ending == "commit":
        await until(lambda: rt.committer.commits > before)
    await rt.committer.idle()
    assert await durable(rt, "later", ["a"]) == ({"a": 1} if ending == "commit" else {})
    if ending == "rollback":
        assert rt.committer.commits == before  # the rolled back write was never committed
        await until(lambda: not rt.find("STORE", "later").background)
        assert rt.sweep(now=rt.clock() + 10) == 1  # and nothing is left that keeps it awake


@pytest.mark.gen_test
async def test_a_write_just_before_an_out_of_turn_transaction_commits_without_the_transactions(rt, flags):
    # The first put asks for a commit soon; by then the transaction is open: nothing is
    # committed until it ends, and then only what it did not roll back.
    loop = asyncio.get_running_loop()
    flags["gate"], flags["written"] = loop.create_future(), loop.create_future()
    await stub(rt, "later").write_later({"a": 1}, transaction="rollback", first={"before": 0})
    flags["gate"].set_result(None)
    await asyncio.wait_for(flags["written"], 5)
    await until(lambda: not rt.find("STORE", "later").background)
    await rt.committer.idle()
    assert await durable(rt, "later", ["before", "a"]) == {"before": 0}


@pytest.mark.gen_test
async def test_a_transactions_txn_offers_the_whole_storage_api(rt):
    assert await stub(rt).txn_api(NOW_MS + 5000) == (True, NOW_MS + 5000, None, {"b": 2})
    assert await stub(rt).do("list") == {"b": 2}


@pytest.mark.gen_test
async def test_a_turns_writes_are_one_commit_even_with_awaits_between_them(rt):
    s = stub(rt)
    before = (rt.committer.commits, rt.committer.batches)
    await s.put_with_pauses({"a": 1, "b": 2, "c": 3})
    assert (rt.committer.commits, rt.committer.batches) == (before[0] + 1, before[1] + 1)
    assert await durable(rt, "s", ["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.gen_test
async def test_a_turn_whose_writes_were_all_rolled_back_commits_nothing(rt):
    s = stub(rt)
    before = rt.committer.commits
    assert await s.txn({"d": 4}, rollback=True) == {"d": 4}
    assert rt.committer.commits == before


@pytest.mark.gen_test
async def test_sync_returns_once_the_writes_so_far_are_durable(rt, flags):
    flags["after_sync"] = lambda: durable(rt, "s", ["k"])
    assert await stub(rt).put_and_sync("k", 1) == {"k": 1}


@pytest.mark.gen_test
async def test_sync_waits_for_an_earlier_write_still_being_committed(recorder, flags):
    # A write outside a turn is being committed (the backend holds it); a turn that wrote
    # nothing itself calls sync(): it returns only once that write is durable.
    backend = GatedBackend()
    clock = FakeClock(start=NOW)
    rt = Runtime(store_app(recorder, flags), clock=clock.monotonic, wall_clock=clock.now, backend=backend)
    await rt.start()
    try:
        loop = asyncio.get_running_loop()
        flags["gate"], flags["written"], flags["syncing"] = (loop.create_future() for _ in range(3))
        flags["after_sync"] = lambda: durable(rt, "later", ["a"])
        await stub(rt, "later").write_later({"a": 1})
        flags["gate"].set_result(None)
        await asyncio.wait_for(flags["written"], 5)
        await until(lambda: backend.waiting == 1)
        syncing = asyncio.ensure_future(stub(rt, "later").sync_alone())
        await asyncio.wait_for(flags["syncing"], 5)
        backend.gate.set()
        assert await asyncio.wait_for(syncing, 5) == {"a": 1}
    finally:
        backend.gate.set()
        await rt.close()


@pytest.mark.gen_test
async def test_get_alarm_sees_the_turns_own_alarm_changes(rt):
    s = stub(rt)
    await s.do("set_alarm", NOW_MS + 1000)
    steps = [
        ("delete_alarm", (), {}),
        ("get_alarm", (), {}),
        ("set_alarm", (NOW_MS + 2000,), {}),
        ("get_alarm", (), {}),
    ]
    assert await s.script(steps) == [None, None, None, NOW_MS + 2000]


@pytest.mark.gen_test
async def test_the_quota_counts_what_the_turn_already_wrote_deleted_or_cleared(make_runtime):
    rt = await make_runtime(Limits(object_storage_bytes=1000))
    try:
        s = stub(rt)
        # two puts of one turn that pass the quota together: the second is refused
        with pytest.raises(QuotaExceededError):
            await s.script([("put", ("a", "x" * 600), {}), ("put", ("b", "y" * 600), {})])
        assert await s.do("list") == {"a": "x" * 600}  # the first put returned: it stays
        # what the turn deleted makes room at once
        await s.script([("delete", ("a",), {}), ("put", ("c", "z" * 900), {})])
        await s.do("delete", "c")
        # and delete_all makes room for everything, whatever the turn wrote before it
        await s.script([("put", ("d", "w" * 600), {}), ("delete_all", (), {}), ("put", ("e", "v" * 900), {})])
        assert await s.do("list") == {"e": "v" * 900}
        assert rt.stats.quota_refusals["object"] == 1
    finally:
        await rt.close()


class ReadCountingHost:
    """Just enough of a StoragePort for reads and writes in a turn: it stores nothing, counts
    what is read, and holds each read until ``hold`` (a future) is resolved, if one is set."""

    limits = Limits(object_storage_bytes=None, storage_bytes=None)

    def __init__(self):
        self.id = DurableObjectId("T", "00" * 32, None)
        self.reads = []
        self.hold = None

    def batch_started(self):
        pass

    def in_own_turn(self):
        return True

    async def read(self, obj, keys):
        self.reads.extend(keys)
        if self.hold is not None:
            await self.hold
        return {}

    async def scan(self, obj, start, end, limit, reverse):
        return []


@pytest.mark.gen_test
async def test_a_read_that_raced_a_commit_does_not_hide_the_committed_value_afterwards():
    host = ReadCountingHost()
    storage = DurableObjectStorage(host)
    host.hold = asyncio.get_running_loop().create_future()
    racing = asyncio.ensure_future(storage.get("k"))  # asks the backend, which answers late
    await until(lambda: host.reads)
    await storage.put("k", 1)  # meanwhile a write of k is committed
    storage.committed(storage.take_pending(), 0)
    host.hold.set_result(None)  # the read answers what the backend held before: nothing
    assert await racing is None
    assert await storage.get("k") == 1  # the stale answer was not remembered


@pytest.mark.gen_test
async def test_list_sees_a_write_still_being_committed_beside_the_turns_own():
    host = ReadCountingHost()
    storage = DurableObjectStorage(host)
    await storage.put("a", 1)
    storage.take_pending()  # submitted: its commit has not returned yet
    await storage.put("b", 2)
    assert await storage.list() == {"a": 1, "b": 2}
    assert await storage.list(limit=1) == {"a": 1}


@pytest.mark.gen_test
async def test_an_awake_object_remembers_at_most_cache_entries_values_oldest_out_first():
    host = ReadCountingHost()
    storage = DurableObjectStorage(host)
    keys = [f"k{i}" for i in range(CACHE_ENTRIES)]
    for i in range(0, len(keys), 128):
        await storage.get(keys[i : i + 128])
    await storage.get("k0")
    assert len(host.reads) == CACHE_ENTRIES  # every one is remembered (as absent)
    await storage.get("one more")
    await storage.get(["k0", "k1"])
    assert host.reads[-2:] == ["one more", "k0"]  # k0 was forgotten for it, k1 not
