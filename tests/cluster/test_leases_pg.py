"""Slot leases and fencing on a real PostgreSQL (started by the test session)."""

import asyncio

import psycopg
import pytest

from wsecho.backends.leases import FencedError, PostgresLeases, fence


async def members(dsn, *names):
    stores = [PostgresLeases(dsn, name) for name in names]
    await stores[0].create_schema()
    return stores


@pytest.mark.gen_test(timeout=30)
async def test_a_slot_is_held_by_one_member_and_taken_over_only_after_expiry_with_a_new_epoch(pg_dsn):
    a, b = await members(pg_dsn, "a", "b")
    try:
        assert await a.acquire([1, 2], ttl=0.5) == {1: 1, 2: 1}
        assert await b.acquire([1, 2], ttl=0.5) == {}  # held by a, not expired
        assert await a.acquire([1], ttl=0.5) == {1: 1}  # a renews: same epoch
        await asyncio.sleep(0.6)  # a's lease on 2 (not renewed) ran out in the database's clock
        assert await b.acquire([2], ttl=5) == {2: 2}  # taken over: the epoch went up
        assert await a.acquire([2], ttl=5) == {}  # and a cannot take it back while b holds it
        await b.release([2])
        assert await a.acquire([2], ttl=5) == {2: 3}
    finally:
        for store in (a, b):
            await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_heartbeats_list_the_live_serving_members(pg_dsn):
    a, b = await members(pg_dsn, "a", "b")
    try:
        assert await a.heartbeat(ttl=5, draining=False) == ["a"]
        assert sorted(await b.heartbeat(ttl=5, draining=False)) == ["a", "b"]
        assert await a.heartbeat(ttl=5, draining=True) == ["b"]  # a drains: no longer a candidate
        await b.leave()
        assert await a.heartbeat(ttl=5, draining=False) == ["a"]
    finally:
        for store in (a, b):
            await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_member_that_lost_its_lease_cannot_commit(pg_dsn):
    a, b = await members(pg_dsn, "a", "b")
    try:
        await a.acquire([5], ttl=0.3)
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, conn.transaction():
            await fence(conn, "a", {5: 1})  # a holds it at epoch 1: fine
        await asyncio.sleep(0.4)
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, conn.transaction():
            await fence(conn, "a", {5: 1})  # expired, but nobody took it: still safe to write
        await b.acquire([5], ttl=5)
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            with pytest.raises(FencedError, match="no longer holds the lease of slot 5"):
                async with conn.transaction():
                    await fence(conn, "a", {5: 1})
    finally:
        for store in (a, b):
            await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_take_over_waits_for_a_commit_that_passed_the_fence(pg_dsn):
    a, b = await members(pg_dsn, "a", "b")
    try:
        await a.acquire([9], ttl=0.2)
        await asyncio.sleep(0.3)  # expired: b may take it, unless a is committing under it
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, conn.transaction():
            await fence(conn, "a", {9: 1})
            take = asyncio.ensure_future(b.acquire([9], ttl=5))
            done, _ = await asyncio.wait([take], timeout=0.3)
            assert not done  # b waits on the row a's commit share-locked
        assert await asyncio.wait_for(take, 5) == {9: 2}  # after a's commit, b takes it
    finally:
        for store in (a, b):
            await store.close()
