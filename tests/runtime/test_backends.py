"""The backend contract, at the Backend interface, for memory, SQLite and PostgreSQL alike.

tests/runtime/test_storage.py runs the same backends through the runtime (group commit, the
output gate, alarms); these tests call the backends directly, where the runtime's cache and
overlay would hide what a backend does.
"""

import asyncio

import psycopg
import pytest

from wsecho import StorageError
from wsecho.backends.base import MemoryBackend, SQLiteBackend, entry_bytes, migrations
from wsecho.backends.dsn import redact
from wsecho.backends.postgres import PostgresBackend, object_slot
from wsecho.core.alarms import AlarmRow
from wsecho.core.batches import Batch
from wsecho.core.placement import slot_of

A = "NS:" + "0a" * 32
B = "NS:" + "ff" * 32

#: Keys whose order by code point (Python's) is their order by UTF-8 bytes (SQLite's memcmp);
#: a collation of a locale would put "é" near "e", "B" near "b", and "a\x00" is no text to it.
KEYS = ["", "\x00", "B", "a", "a\x00", "a\x00b", "ab", "b", "e", "z", "~", "\x7f", "é", "ÿ", "ā", "中", "\ufffd", "😀"]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def kind(request):
    return request.param


@pytest.fixture
def make_backend(kind, request, tmp_path):
    """Opens a backend on the test's data (each call: the same data); the test closes it."""
    url = request.getfixturevalue("postgres_url") if kind == "postgres" else None
    shared = MemoryBackend()

    async def make():
        if kind == "memory":
            backend = shared
        elif kind == "sqlite":
            backend = SQLiteBackend(tmp_path / "data")
        else:
            backend = PostgresBackend(url)
        return backend, await backend.open()

    return make


def put(obj, **writes):
    return Batch(obj, writes=dict(writes))


@pytest.mark.gen_test
async def test_keys_sort_by_their_utf8_bytes(make_backend):
    backend, _ = await make_backend()
    try:
        assert sorted(KEYS) == sorted(KEYS, key=lambda k: k.encode("utf-8"))
        await backend.commit([Batch(A, writes={k: b"j" + str(i).encode() for i, k in enumerate(KEYS)})])
        everything = await backend.scan(A, None, None, None, False)
        assert [k for k, _ in everything] == sorted(KEYS)
        assert await backend.read(A, ["a\x00", "中", "missing"]) == {
            "a\x00": b"j" + str(KEYS.index("a\x00")).encode(),
            "中": b"j" + str(KEYS.index("中")).encode(),
        }
        between = await backend.scan(A, "a", "é", None, False)
        assert [k for k, _ in between] == [k for k in sorted(KEYS) if "a" <= k < "é"]
    finally:
        await backend.close()


@pytest.mark.gen_test
async def test_reverse_scans_with_bounds_and_limits(make_backend):
    backend, _ = await make_backend()
    try:
        await backend.commit([Batch(A, writes={f"k{i:02d}": b"j%d" % i for i in range(20)})])
        await backend.commit([put(B, k05=b"jB")])  # another object's keys never show
        last3 = await backend.scan(A, None, None, 3, True)
        assert last3 == [("k19", b"j19"), ("k18", b"j18"), ("k17", b"j17")]
        window = await backend.scan(A, "k05", "k10", 2, True)
        assert window == [("k09", b"j9"), ("k08", b"j8")]
        assert await backend.scan(A, "k05", "k10", None, False) == [(f"k{i:02d}", b"j%d" % i) for i in range(5, 10)]
        assert await backend.scan(A, "k05", "k05", None, False) == []
        assert await backend.scan(A, None, None, 0, True) == []
    finally:
        await backend.close()


@pytest.mark.gen_test
async def test_delete_all_then_writes_in_the_same_batch(make_backend):
    backend, _ = await make_backend()
    try:
        await backend.commit([put(A, a=b"j1", b=b"j2"), put(B, a=b"j3")])
        changes = await backend.commit([Batch(A, clear=True, writes={"c": b"j4", "a": None})])
        assert await backend.scan(A, None, None, None, False) == [("c", b"j4")]
        assert await backend.read(B, ["a"]) == {"a": b"j3"}  # another object's data stays
        assert changes == {A: entry_bytes("c", b"j4") - entry_bytes("a", b"j1") - entry_bytes("b", b"j2")}
        assert await backend.usage(A) == entry_bytes("c", b"j4")
        await backend.commit([Batch(A, clear=True)])
        assert await backend.usage(A) == 0
        assert await backend.usage(None) == entry_bytes("a", b"j3")
    finally:
        await backend.close()


@pytest.mark.gen_test
async def test_usage_deltas_of_several_objects_in_one_commit(make_backend):
    backend, _ = await make_backend()
    try:
        await backend.commit([put(A, k=b"j" + b"1" * 9)])
        changes = await backend.commit(
            [
                put(A, k=b"j1"),  # 10 bytes of value become 2
                put(B, **{"é": b"j22"}),
                put(A, new=b"j333", k=None),  # a second batch of A in the same commit
                Batch("wsecho:probe", writes={"probe": b"j0"}),
                Batch("wsecho:probe", writes={"probe": None}),
            ]
        )
        assert changes == {
            A: entry_bytes("new", b"j333") - entry_bytes("k", b"j" + b"1" * 9),
            B: entry_bytes("é", b"j22"),
            "wsecho:probe": 0,
        }
        assert await backend.usage(A) == entry_bytes("new", b"j333")
        assert await backend.usage(B) == len("é".encode()) + 3
        assert await backend.usage(None) == entry_bytes("new", b"j333") + entry_bytes("é", b"j22")
    finally:
        await backend.close()


@pytest.mark.gen_test
async def test_alarms_are_set_replaced_cleared_and_returned_by_open(make_backend, kind):
    backend, alarms = await make_backend()
    first = AlarmRow(A, "NS", "0a" * 32, "room \x00 ✓", 1_000)
    try:
        assert alarms == []
        await backend.commit([Batch(A, alarm=first), Batch(B, alarm=AlarmRow(B, "NS", "ff" * 32, None, 2_000))])
        await backend.commit([Batch(B, alarm=AlarmRow(B, "NS", "ff" * 32, None, 3_000))])  # one per object
        await backend.commit([put(A, k=b"j1")])  # the default: the alarm stays
    finally:
        await backend.close()
    backend, alarms = await make_backend()
    try:
        assert sorted(alarms, key=lambda r: r.object) == [first, AlarmRow(B, "NS", "ff" * 32, None, 3_000)]
        await backend.commit([Batch(A, alarm=None)])
    finally:
        await backend.close()
    backend, alarms = await make_backend()
    await backend.close()
    assert [r.object for r in alarms] == [B]


@pytest.mark.gen_test
async def test_a_commit_that_fails_leaves_nothing(make_backend, kind):
    if kind == "memory":
        pytest.skip("the memory backend has no transactions and no failures")
    backend, _ = await make_backend()
    try:
        await backend.commit([put(A, keep=b"j0")])
        before = await backend.usage(None)
        bad = AlarmRow(B, "NS", "ff" * 32, None, 2**70)  # no 64-bit integer column holds it
        with pytest.raises((StorageError, OverflowError)):
            await backend.commit(
                [put(A, keep=None, new=b"j1"), Batch(A, clear=True), put(B, x=b"j2"), Batch(B, alarm=bad)]
            )
        assert await backend.scan(A, None, None, None, False) == [("keep", b"j0")]
        assert await backend.scan(B, None, None, None, False) == []
        assert await backend.usage(None) == before
        await backend.commit([put(B, x=b"j2")])  # and the backend goes on working
        assert await backend.read(B, ["x"]) == {"x": b"j2"}
    finally:
        await backend.close()


# -- PostgreSQL only ------------------------------------------------------------------------------


def test_redact_removes_the_password_only():
    assert redact("postgresql://app:s3cret@db.example:5433/wsecho?sslmode=require") == (
        "postgresql://app@db.example:5433/wsecho?sslmode=require"
    )
    assert redact("postgres://db/wsecho?password=s3cret&application_name=x") == (
        "postgres://db/wsecho?application_name=x"
    )
    assert redact("postgresql://:pw@host/db") == "postgresql://host/db"
    assert redact("postgresql:///wsecho?host=/run/postgresql") == "postgresql:///wsecho?host=/run/postgresql"
    assert (
        redact("postgresql://h/d?options=-csearch_path%3Dx&PASSWORD=p") == "postgresql://h/d?options=-csearch_path%3Dx"
    )


def test_object_slot():
    assert object_slot(A) == slot_of("0a" * 32)
    assert object_slot("a:b:" + "ff" * 32) == slot_of("ff" * 32)
    assert object_slot("wsecho:probe") is None


@pytest.mark.gen_test
async def test_postgres_errors_name_the_database_and_never_the_password(postgres_server):
    url = f"postgresql://wsecho:s3cret@127.0.0.1:{postgres_server.port}/no_such_database"
    with pytest.raises(StorageError) as caught:
        await PostgresBackend(url).open()
    message = str(caught.value)
    assert f"cannot connect to the PostgreSQL database postgresql://wsecho@127.0.0.1:{postgres_server.port}" in message
    assert "no_such_database" in message
    assert "s3cret" not in message


@pytest.mark.gen_test
async def test_postgres_migrates_once_when_processes_start_together(postgres_url):
    backends = [PostgresBackend(postgres_url) for _ in range(4)]
    await asyncio.gather(*(b.open() for b in backends))
    try:
        await backends[0].commit([put(A, k=b"j1")])
        assert await backends[3].read(A, ["k"]) == {"k": b"j1"}
    finally:
        await asyncio.gather(*(b.close() for b in backends))
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM wsecho_schema").fetchall() == [(migrations("postgres")[-1][0],)]


@pytest.mark.gen_test
async def test_postgres_refuses_a_newer_schema(postgres_url):
    backend = PostgresBackend(postgres_url)
    await backend.open()
    await backend.close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE wsecho_schema SET version = 99")
    with pytest.raises(StorageError, match="has wsecho schema version 99, newer than this wsecho knows"):
        await PostgresBackend(postgres_url).open()


@pytest.mark.gen_test
async def test_postgres_stores_each_rows_slot(postgres_url):
    backend = PostgresBackend(postgres_url)
    await backend.open()
    try:
        await backend.commit([put(A, k=b"j1"), Batch(B, alarm=AlarmRow(B, "NS", "ff" * 32, None, 5))])
    finally:
        await backend.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT slot FROM kv").fetchall() == [(slot_of("0a" * 32),)]
        assert conn.execute("SELECT slot FROM alarms").fetchall() == [(slot_of("ff" * 32),)]


@pytest.mark.gen_test
async def test_a_fence_runs_first_in_the_commits_transaction(postgres_url):
    seen = []

    async def fence(conn, batches):
        # it runs before the commit's own writes: it sees what the earlier commits left
        cur = await conn.execute("SELECT value FROM kv WHERE object = %s", (A,))
        seen.append(([b.object for b in batches], [bytes(v) for (v,) in await cur.fetchall()]))
        await conn.execute("CREATE TABLE IF NOT EXISTS fenced (n integer)")
        await conn.execute("INSERT INTO fenced VALUES (1)")
        if len(seen) == 2:
            msg = "slot 7 has a newer epoch"
            raise StorageError(msg)

    backend = PostgresBackend(postgres_url, fence=fence)
    await backend.open()
    try:
        await backend.commit([put(A, k=b"j1")])
        with pytest.raises(StorageError, match="slot 7 has a newer epoch"):
            await backend.commit([put(A, k=b"j2"), put(B, k=b"j3")])
        assert await backend.read(A, ["k"]) == {"k": b"j1"}
        assert await backend.read(B, ["k"]) == {}
    finally:
        await backend.close()
    assert seen == [([A], []), ([A, B], [b"j1"])]
    with psycopg.connect(postgres_url) as conn:  # the refused commit's own writes went too
        assert conn.execute("SELECT count(*) FROM fenced").fetchone() == (1,)
