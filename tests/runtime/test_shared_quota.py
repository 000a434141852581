"""``--max-storage`` across processes: two runtimes on one database (the workers of
``--workers 2`` on SQLite, two cluster members on PostgreSQL) hold all objects together to
the quota, within the bound docs/operations.md states."""

from datetime import UTC, datetime

import pytest

from tests.apps.store import store_app
from wsecho import Limits, QuotaExceededError
from wsecho.api import codec
from wsecho.backends.base import SQLiteBackend, entry_bytes
from wsecho.backends.postgres import PostgresBackend
from wsecho.runtime.commits import RECOUNT_SHARE
from wsecho.runtime.runtime import STORAGE_RECOUNT_INTERVAL, Runtime
from wsecho.testing import FakeClock

QUOTA = 64_000
VALUE = "x" * 500
#: What one put adds: its key and its encoded value.
ENTRY = entry_bytes("k000", codec.encode(VALUE))
#: The documented bound for two processes: one share of the quota, plus one commit group
#: (here one put: each put commits before the next).
BOUND = QUOTA + (2 - 1) * (QUOTA // RECOUNT_SHARE + ENTRY)


@pytest.fixture(params=["sqlite", "postgres"])
def open_backend(request, tmp_path):
    """Opens the shared database: SQLite as the workers of --workers do (the supervisor holds
    the directory's lock), or PostgreSQL as cluster members do."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        return lambda: PostgresBackend(url)
    (tmp_path / "data").mkdir()
    return lambda: SQLiteBackend(tmp_path / "data", lock=False)


@pytest.fixture
def two_runtimes(open_backend, recorder, io_loop):
    clock = FakeClock(start=datetime(2026, 1, 2, tzinfo=UTC))
    runtimes = []

    async def start():
        for _ in range(2):
            rt = Runtime(
                store_app(recorder, {}),
                clock=clock.monotonic,
                wall_clock=clock.now,
                backend=open_backend(),
                limits=Limits(storage_bytes=QUOTA, object_storage_bytes=None),
            )
            await rt.start()
            runtimes.append(rt)

    io_loop.run_sync(start)
    yield runtimes
    for rt in runtimes:
        io_loop.run_sync(rt.close)


async def fill(runtimes, names):
    """Each object writes one entry at a time, in turn, until the quota refuses each of them;
    return the refusals."""
    refused = {}
    for i in range(1000):
        for rt, name in zip(runtimes, names, strict=True):
            if name not in refused:
                try:
                    await rt.env.STORE.get_by_name(name).do("put", f"k{i:03}", VALUE)
                except QuotaExceededError as exc:
                    refused[name] = str(exc)
        if len(refused) == len(names):
            return refused
    raise AssertionError(f"never refused: {set(names) - set(refused)}")


@pytest.mark.gen_test(timeout=60)
async def test_two_processes_on_one_database_together_stay_within_the_quota(two_runtimes):
    a, b = two_runtimes
    refused = await fill([a, b], ["on-a", "on-b"])
    total = await a.backend.usage(None)
    # Before, each process counted only what it stored itself: together they stored twice the quota.
    assert QUOTA - 2 * ENTRY < total <= BOUND
    for message in refused.values():
        assert "the quota is 64,000 (--max-storage)" in message
    assert a.stats.quota_refusals["total"] >= 1
    assert b.stats.quota_refusals["total"] >= 1


@pytest.mark.gen_test(timeout=60)
async def test_a_refused_process_sees_what_another_deleted_at_its_next_sweep(two_runtimes):
    a, b = two_runtimes
    await fill([a, b], ["on-a", "on-b"])
    await b.env.STORE.get_by_name("on-b").do("delete_all")
    a_store = a.env.STORE.get_by_name("on-a")
    with pytest.raises(QuotaExceededError):  # a has not read the total again yet
        await a_store.do("put", "more", VALUE)
    a.sweep(now=a.clock() + STORAGE_RECOUNT_INTERVAL)
    await a.committer.idle()
    await a_store.do("put", "more", VALUE)
    assert a.committer.stored_bytes == await a.backend.usage(None)


@pytest.mark.gen_test(timeout=60)
async def test_one_process_alone_is_held_to_the_quota_to_the_byte_while_it_recounts(two_runtimes):
    a = two_runtimes[0]
    store = a.env.STORE.get_by_name("alone")
    for i in range(QUOTA // ENTRY - 1):
        await store.do("put", f"k{i:03}", VALUE)
    assert a.committer.recounts > 0  # near the quota, each commit read the total again
    room = QUOTA - a.committer.stored_bytes
    last = "y" * (room - entry_bytes("last", codec.encode("")))
    with pytest.raises(QuotaExceededError, match=r"would store 64,001 bytes; the quota is 64,000 \(--max-storage\)"):
        await store.do("put", "last", last + "y")
    await store.do("put", "last", last)
    assert a.committer.stored_bytes == await a.backend.usage(None) == QUOTA
