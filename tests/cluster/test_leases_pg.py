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
async def test_a_slot_is_held_by_one_member_and_taken_over_only_after_expiry_with_a_new_epoch(postgres_url):
    a, b = await members(postgres_url, "a", "b")
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
async def test_heartbeats_list_the_live_serving_members(postgres_url):
    a, b = await members(postgres_url, "a", "b")
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
async def test_a_member_that_lost_its_lease_cannot_commit(postgres_url):
    a, b = await members(postgres_url, "a", "b")
    try:
        await a.acquire([5], ttl=0.3)
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn, conn.transaction():
            await fence(conn, "a", {5: 1})  # a holds it at epoch 1: fine
        await asyncio.sleep(0.4)
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn, conn.transaction():
            await fence(conn, "a", {5: 1})  # expired, but nobody took it: still safe to write
        await b.acquire([5], ttl=5)
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
            with pytest.raises(FencedError, match="no longer holds the lease of slot 5"):
                async with conn.transaction():
                    await fence(conn, "a", {5: 1})
    finally:
        for store in (a, b):
            await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_commit_that_passed_the_fence_keeps_its_slot_from_a_take_over_but_not_its_owner_renewing(postgres_url):
    a, b = await members(postgres_url, "a", "b")
    try:
        await a.acquire([9, 10], ttl=0.2)
        await asyncio.sleep(0.3)  # expired: b may take them, unless a is committing under them
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn, conn.transaction():
            await fence(conn, "a", {9: 1})
            # b skips the slot a's commit holds (it does not wait: one stuck commit must not
            # stop b's own renewals), and takes the other.
            assert await asyncio.wait_for(b.acquire([9, 10], ttl=5), 5) == {10: 2}
            # a renews its slot although its own commit holds the row.
            assert await asyncio.wait_for(a.acquire([9], ttl=5), 5) == {9: 1}
        await a.release([9])
        assert await b.acquire([9], ttl=5) == {9: 2}  # after a's commit and release, b takes it
    finally:
        for store in (a, b):
            await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_commit_sent_in_one_message_is_fenced_by_the_server(postgres_url):
    from wsecho.backends.leases import fence_sql
    from wsecho.backends.postgres import PostgresBackend
    from wsecho.core.batches import Batch
    from wsecho.core.placement import slot_of

    a, b = await members(postgres_url, "a", "b")
    hex_id = "ab" * 32
    slot = slot_of(hex_id)
    backend = PostgresBackend(postgres_url)
    await backend.open()
    try:
        await a.acquire([slot], ttl=0.2)
        backend.fence_sql = lambda batches: fence_sql("a", {slot: 1})
        await backend.commit([Batch(f"NS:{hex_id}", writes={"k": b"1"})])  # a holds it: written
        await asyncio.sleep(0.3)
        assert await b.acquire([slot], ttl=5) == {slot: 2}
        with pytest.raises(FencedError, match="no longer holds the lease"):
            await backend.commit([Batch(f"NS:{hex_id}", writes={"k": b"2"})])  # a's epoch is stale
        assert await backend.read(f"NS:{hex_id}", ["k"]) == {"k": b"1"}  # nothing of it landed
        backend.fence_sql = lambda batches: fence_sql("b", {slot: 2})
        await backend.commit([Batch(f"NS:{hex_id}", writes={"k": b"3"})])
        assert await backend.read(f"NS:{hex_id}", ["k"]) == {"k": b"3"}
    finally:
        await backend.close()
        for store in (a, b):
            await store.close()
