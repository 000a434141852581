"""``ctx.storage.sql``: Cloudflare's SQL examples across hibernation and restarts, the limits,
the refusals, the output gate and ``delete_all``."""

import asyncio
import sqlite3

import pytest

from tests.apps import sql_app
from wsecho import App, DurableObject, InvalidArgumentError, Limits, QuotaExceededError
from wsecho.backends.base import MemoryBackend, SQLiteBackend
from wsecho.backends.objectdb import FileDatabases
from wsecho.core.errors import ConfigError, InvalidStateError, ObjectResetError, SqlError
from wsecho.runtime.runtime import Runtime
from wsecho.testing import FakeClock


@pytest.fixture(params=["memory", "sqlite"])
def backend_factory(request, tmp_path):
    if request.param == "memory":
        shared = MemoryBackend()
        return lambda: shared
    return lambda: SQLiteBackend(tmp_path / "data")


@pytest.fixture
def make_runtime(backend_factory, io_loop):
    made = []

    async def make(limits=None, app=sql_app.app):
        clock = FakeClock()
        rt = Runtime(app, clock=clock.monotonic, wall_clock=clock.now, backend=backend_factory(), limits=limits)
        await rt.start()
        made.append(rt)
        return rt

    yield make
    for rt in made:  # every database closed (Python 3.13 warns about a connection left to the collector)
        io_loop.run_sync(rt.close)


@pytest.fixture
def rt(make_runtime, io_loop):
    return io_loop.run_sync(make_runtime)


def hibernate_all(rt):
    return rt.sweep(now=rt.clock() + 3600)


# -- Cloudflare's examples ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_counter_counts_across_hibernation_and_keeps_kv_beside_it(rt):
    counter = rt.env.COUNTER.get_by_name("a")
    assert await counter.increment("ann") == 1
    assert await counter.increment("bob") == 2
    assert hibernate_all(rt) == 1
    assert rt.find("COUNTER", "a") is None  # hibernated with no socket: forgotten, its database closed
    assert await counter.increment("cy") == 3
    assert await counter.read() == {"value": 3, "last": "cy"}
    assert await rt.env.COUNTER.get_by_name("b").read() == {"value": 0, "last": None}


@pytest.mark.gen_test
async def test_a_reset_mid_turn_loses_the_turns_sql_and_kv_writes_together(rt):
    counter = rt.env.COUNTER.get_by_name("r")
    assert await counter.increment("ann") == 1
    with pytest.raises(ObjectResetError, match="the test resets the object mid-turn"):
        await asyncio.wait_for(counter.increment_and_abort(), 10)
    assert rt.stats.evictions["abort"] == 1
    assert await counter.read() == {"value": 1, "last": "ann"}
    assert await counter.increment("bob") == 2


@pytest.mark.gen_test
async def test_the_counter_survives_a_restart(make_runtime, backend_factory):
    if isinstance(backend_factory(), MemoryBackend):
        pytest.skip("in memory, nothing survives a restart")
    first = await make_runtime()
    await first.env.COUNTER.get_by_name("a").increment("ann")
    await first.env.COUNTER.get_by_name("a").increment("bob")
    await first.close()
    second = await make_runtime()
    try:
        assert await second.env.COUNTER.get_by_name("a").read() == {"value": 2, "last": "bob"}
    finally:
        await second.close()


@pytest.mark.gen_test
async def test_a_table_with_an_index_is_queried_through_it(rt):
    artists = rt.env.ARTISTS.get_by_name("x")
    await artists.seed()
    assert await artists.by_name("Bob") == [456]
    assert "artist_by_name" in await artists.plan("Bob")
    hibernate_all(rt)
    assert await artists.all() == [[123, "Alice"], [456, "Bob"], [789, "Charlie"]]


@pytest.mark.gen_test
async def test_a_failed_transaction_sync_undoes_all_of_its_writes(rt):
    bank = rt.env.BANK.get_by_name("b")
    await bank.open("ann", 10)
    await bank.open("bob", 0)
    assert await bank.transfer("ann", "bob", 4) == "done"
    assert await bank.transfer("ann", "bob", 7) == "ann has not 7"
    hibernate_all(rt)
    assert await bank.balances() == {"ann": 6, "bob": 4}


# -- the cursor --------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_cursor_reports_columns_and_rows_read_and_written(rt):
    c = rt.env.COUNTER.get_by_name("c")
    await c.run("CREATE TABLE t (a INTEGER, b TEXT)")
    written = await c.run("INSERT INTO t VALUES (?, ?), (?, ?)", 1, "x", 2, None)
    assert written["written"] == 2
    assert await c.run("SELECT a, b FROM t ORDER BY a") == {
        "rows": [{"a": 1, "b": "x"}, {"a": 2, "b": None}],
        "columns": ["a", "b"],
        "read": 2,
        "written": 0,
    }


def test_one_wants_exactly_one_row():
    from wsecho.api.sql import SqlCursor

    assert SqlCursor(["a"], [(1,)], 0).one() == {"a": 1}
    with pytest.raises(InvalidStateError, match="has 2 rows left; one"):
        SqlCursor(["a"], [(1,), (2,)], 0).one()
    with pytest.raises(InvalidStateError, match="has 0 rows left"):
        SqlCursor(["a"], [], 0).one()
    cursor = SqlCursor(["a", "b"], [(1, 2), (3, 4)], 0)
    assert next(cursor) == {"a": 1, "b": 2}
    assert list(cursor.raw()) == [[3, 4]]  # rows are consumed once, as Cloudflare's
    assert cursor.to_list() == []


# -- limits and refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "bindings", "error", "message"),
    [
        ("SELECT ?" + ", ?" * 100, [1] * 101, InvalidArgumentError, "101 bindings; the limit is 100"),
        ("SELECT '" + "x" * 100_000 + "'", [], InvalidArgumentError, "100,009 UTF-8 bytes; the limit is 100,000"),
        ("SELECT ?", ["x" * 2_000_001], InvalidArgumentError, "binding 1 is 2,000,001 bytes; the limit is 2,000,000"),
        ("SELECT zeroblob(2000001)", [], InvalidArgumentError, "over 2,000,000 bytes"),
        ("SELECT ?", [object()], InvalidArgumentError, "binding 1 is a object"),
        ("ATTACH DATABASE 'other.db' AS other", [], SqlError, "refused: ATTACH"),
        ("VACUUM INTO 'copy.db'", [], SqlError, "cannot VACUUM from within a transaction"),
        ("PRAGMA synchronous = OFF", [], SqlError, "refused: PRAGMA synchronous"),
        ("PRAGMA journal_mode = DELETE", [], SqlError, "refused: PRAGMA journal_mode"),
        ("BEGIN", [], SqlError, "use ctx.storage.transaction_sync"),
        ("SELECT * FROM _cf_KV", [], SqlError, "reserved"),
        ("SELECT 1; SELECT ?", [1], InvalidArgumentError, "bindings go with one statement"),
        ("SELECT * FROM nowhere", [], SqlError, "no such table: nowhere"),
    ],
)
@pytest.mark.gen_test
async def test_limits_and_refusals_raise_clear_errors(rt, query, bindings, error, message):
    c = rt.env.COUNTER.get_by_name("limits")
    with pytest.raises(error, match=message):
        await c.run(query, *bindings)
    # the object keeps serving, its data intact
    assert await c.increment() == 1
    assert await c.run("PRAGMA table_info(counters)") is not None


@pytest.mark.gen_test
async def test_a_database_over_the_object_quota_is_refused_and_keeps_what_it_had(make_runtime):
    rt = await make_runtime(Limits(object_storage_bytes=256 * 1024))
    try:
        c = rt.env.COUNTER.get_by_name("q")
        await c.run("CREATE TABLE blobs (b BLOB)")
        await c.run("INSERT INTO blobs VALUES (zeroblob(50000))")
        refused = None
        for _ in range(10):
            try:
                await c.run("INSERT INTO blobs VALUES (zeroblob(50000))")
            except QuotaExceededError as exc:
                refused = str(exc)
                break
        assert "past 262,144 bytes (--max-object-storage)" in refused
        count = (await c.run("SELECT count(*) AS n FROM blobs"))["rows"][0]["n"]
        assert 1 <= count < 6
        assert await c.size() <= 256 * 1024
        hibernate_all(rt)
        assert (await c.run("SELECT count(*) AS n FROM blobs"))["rows"][0]["n"] == count
        assert rt.stats.quota_refusals["object"] == 1
    finally:
        await rt.close()


# -- delete_all, the output gate, configuration ------------------------------------------------------


@pytest.fixture
def on_sqlite(tmp_path, io_loop):
    """A runtime on SQLite in ``tmp_path``, whatever the backend parameter."""
    clock = FakeClock()
    runtime = Runtime(sql_app.app, clock=clock.monotonic, wall_clock=clock.now, backend=SQLiteBackend(tmp_path))
    io_loop.run_sync(runtime.start)
    yield runtime
    io_loop.run_sync(runtime.close)


@pytest.mark.gen_test
async def test_delete_all_removes_the_objects_file(on_sqlite, tmp_path):
    rt = on_sqlite
    c = rt.env.COUNTER.get_by_name("gone")
    await c.increment("ann")
    path = FileDatabases(tmp_path).path("COUNTER", rt.find("COUNTER", "gone").id.hex)
    assert path.exists()
    await c.wipe()
    assert not path.exists()
    assert not path.with_name(path.name + "-wal").exists()
    with pytest.raises(SqlError, match="no such table: counters"):
        await c.read()  # as Cloudflare's: the tables went too
    hibernate_all(rt)
    assert await c.read() == {"value": 0, "last": None}  # a fresh database, the table made again


@pytest.mark.gen_test
async def test_a_reply_waits_for_the_turns_sql_commit(on_sqlite, tmp_path):
    """Between a write and its commit what the object sends is held back."""
    rt = on_sqlite
    c = rt.env.COUNTER.get_by_name("g")
    await c.increment()
    host = rt.find("COUNTER", "g")
    storage = host.storage
    storage.sql.exec("INSERT INTO counters VALUES ('other', 5)")  # outside a turn: commits soon
    assert storage.busy()
    assert host.gate == []  # held: nothing may leave before the commit
    other = sqlite3.connect(FileDatabases(tmp_path).path("COUNTER", host.id.hex))
    try:
        assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 1  # not yet
        await storage.sync()
        assert other.execute("SELECT count(*) FROM counters").fetchone()[0] == 2
    finally:
        other.close()
    assert host.gate is None


def test_sql_storage_is_refused_at_start_with_storage_postgresql():
    from wsecho.serve.config import Settings
    from wsecho.serve.server import Server

    settings = Settings(port=0, storage="postgresql://wsecho@127.0.0.1:9/nowhere")  # never connected
    with pytest.raises(ConfigError, match=r'Counter \(bound as COUNTER\) declares storage = "sql".*PostgresBackend'):
        Server(sql_app.app, settings)


def test_a_storage_kind_that_does_not_exist_is_refused():
    class Odd(DurableObject):
        storage = "redis"

    clock = FakeClock()
    with pytest.raises(ConfigError, match=r"Odd \(bound as ODD\) has storage = 'redis'"):
        Runtime(App(fetch=sql_app.fetch, bindings={"ODD": Odd}), clock=clock.monotonic, wall_clock=clock.now)


@pytest.mark.gen_test
async def test_a_kv_class_is_told_how_to_get_sql():
    clock = FakeClock()
    plain = Runtime(
        App(fetch=sql_app.fetch, bindings={"PLAIN": DurableObject}), clock=clock.monotonic, wall_clock=clock.now
    )
    host = plain.host(plain.env.PLAIN.id_from_name("p"), DurableObject)
    with pytest.raises(InvalidStateError, match='set storage = "sql"'):
        host.open_storage().sql  # noqa: B018
