"""A handler's read from PostgreSQL does not hold up the cancellation of its turn."""

import asyncio

import pytest

from wsecho.backends.postgres import PostgresBackend


@pytest.mark.gen_test
async def test_a_cancelled_read_ends_its_turn_at_once_while_psycopg_cancels_in_the_background():
    backend = PostgresBackend("postgresql://nobody@127.0.0.1:1/none")  # never connected
    started, server_answers = asyncio.Event(), asyncio.Event()

    async def slow_read(obj, keys):  # psycopg's behaviour: a cancelled query is cancelled on the server first
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await server_answers.wait()  # seconds when the server cannot be reached
            raise
        return {}

    backend._read = slow_read  # the driver's side of the read, replaced
    turn = asyncio.ensure_future(backend.read("ROOM:x", ["count"]))
    await asyncio.wait_for(started.wait(), 5)
    turn.cancel()
    await asyncio.wait_for(asyncio.wait([turn]), 5)  # at once: not after the server answered
    assert turn.cancelled()
    assert not server_answers.is_set()
    server_answers.set()
