"""The group committer: what each waiter is told, what it counts, and when it reports health."""

import asyncio
import logging

import pytest

from tests.helpers import until
from tests.runtime.test_storage import GatedBackend
from wsecho import StorageError
from wsecho.backends.base import MemoryBackend, entry_bytes
from wsecho.core.batches import Batch
from wsecho.runtime.commits import GroupCommitter


def put(obj, key, value=b"v"):
    return Batch(obj, writes={key: value})


async def committing(batch):
    """A committer whose backend holds its commits, and the commit of ``batch``, started."""
    backend = GatedBackend()
    committer = GroupCommitter(backend)
    commit = asyncio.ensure_future(committer.commit(batch))
    await until(lambda: backend.waiting == 1)
    return backend, committer, commit


@pytest.mark.gen_test
async def test_commits_and_batches_are_counted_from_zero():
    # Both are exported as counters (wsecho_storage_commits, wsecho_storage_batches).
    committer = GroupCommitter(MemoryBackend())
    assert (committer.commits, committer.batches) == (0, 0)
    await committer.commit_many([put("A", "a"), put("B", "b")])
    assert (committer.commits, committer.batches) == (1, 2)


@pytest.mark.gen_test
async def test_an_objects_change_is_told_once_when_a_group_has_two_batches_of_it():
    backend, committer, first = await committing(put("Z", "z"))
    # These arrive while that commit runs: they share the next one.
    both = asyncio.ensure_future(committer.commit_many([put("X", "a"), put("X", "b")]))
    again = asyncio.ensure_future(committer.commit(put("X", "c")))
    backend.gate.set()
    assert await asyncio.wait_for(first, 5) == entry_bytes("z", b"v")
    # X's change of the whole group goes to the first waiter with a batch of X, none to the other.
    assert await asyncio.wait_for(both, 5) == 3 * entry_bytes("a", b"v")
    assert await asyncio.wait_for(again, 5) == 0
    assert committer.batches == 4


@pytest.mark.gen_test
async def test_idle_returns_once_every_submitted_batch_is_committed():
    backend, committer, commit = await committing(put("A", "a"))
    backend.gate.set()
    await asyncio.wait_for(committer.idle(), 5)
    assert backend.data == {"A": {"a": b"v"}}
    assert commit.done()


@pytest.mark.gen_test
async def test_health_is_reported_when_commits_start_failing_and_when_they_recover():
    backend = GatedBackend()
    backend.gate.set()
    committer = GroupCommitter(backend)
    # Without a callback a failure is only the waiter's error.
    backend.fail = True
    with pytest.raises(StorageError, match="disk on fire"):
        await committer.commit(put("A", "a"))
    assert str(committer.failure) == "disk on fire"
    backend.fail = False
    await committer.commit(put("A", "a"))
    assert committer.failure is None
    reported = []
    committer.on_health = reported.append
    await committer.commit(put("A", "b"))
    assert reported == []  # healthy, and it was: nothing to report
    backend.fail = True
    for _ in range(2):
        with pytest.raises(StorageError):
            await committer.commit(put("A", "c"))
    assert [str(r) for r in reported] == ["disk on fire"]  # once, when it started
    backend.fail = False
    await committer.commit(put("A", "c"))
    assert [None if r is None else str(r) for r in reported] == ["disk on fire", None]


@pytest.mark.gen_test
async def test_with_a_quota_the_total_is_read_again_after_each_64th_of_it_is_committed():
    backend = MemoryBackend()
    committer = GroupCommitter(backend)
    await committer.commit(put("A", "a", b"x" * 98))  # without a quota: never read again
    assert (committer.stored_bytes, committer.recounts) == (99, 0)
    committer.quota = 6400  # a 64th is 100 bytes
    await committer.commit(put("B", "b", b"x" * 98))  # 99 since the last reading
    assert (committer.stored_bytes, committer.recounts) == (198, 0)
    await committer.commit(put("B", "b", b"x" * 99))  # 100: read again, after this group
    await asyncio.wait_for(committer.idle(), 5)
    assert committer.recounts == 1
    await backend.commit([put("OTHER", "k", b"x" * 999)])  # 1000 bytes another process stored meanwhile
    await committer.commit(put("B", "b", b"x" * 198))  # 99 since that reading
    await asyncio.wait_for(committer.idle(), 5)
    assert (committer.stored_bytes, committer.recounts) == (298, 1)
    commits = committer.commits
    committer.recount()  # asked for (the sweep, near the quota): the other process's bytes count
    await asyncio.wait_for(committer.idle(), 5)
    assert (committer.stored_bytes, committer.recounts) == (1298, 2)
    assert committer.commits == commits  # a reading, not a commit
    await committer.commit(put("B", "b", b"x" * 297))  # 99 since that reading: not yet
    await committer.commit(put("B", "b", b"x" * 298))  # 100
    await asyncio.wait_for(committer.idle(), 5)
    assert (committer.stored_bytes, committer.recounts) == (1398, 3)


@pytest.mark.gen_test
async def test_under_64_bytes_of_quota_every_growing_commit_reads_the_total_again():
    committer = GroupCommitter(MemoryBackend())
    committer.quota = 100  # far from it, but a 64th of it is under 2 bytes
    await committer.commit(put("A", "a", b""))  # 1 byte
    await asyncio.wait_for(committer.idle(), 5)
    assert committer.recounts == 1


@pytest.mark.gen_test
async def test_near_the_quota_only_a_commit_that_grows_reads_the_total_again():
    committer = GroupCommitter(MemoryBackend())
    committer.quota = 6400
    await committer.commit(put("A", "a", b"x" * 6349))  # 6350 bytes, within a 64th of the quota
    await asyncio.wait_for(committer.idle(), 5)
    assert committer.recounts == 1
    await committer.commit(put("A", "a", b"y" * 6349))  # the same size: nothing grew
    await asyncio.wait_for(committer.idle(), 5)
    assert committer.recounts == 1
    await committer.commit(put("A", "a", b"y" * 6350))  # one byte more, within a 64th: read again
    await asyncio.wait_for(committer.idle(), 5)
    assert committer.recounts == 2


class FlakyUsage(MemoryBackend):
    fail = False

    async def usage(self, obj):
        if self.fail:
            raise StorageError("database gone")
        return await super().usage(obj)


@pytest.mark.gen_test
async def test_a_failing_reading_of_the_total_keeps_the_count_and_is_logged_once_per_outage(caplog):
    caplog.set_level(logging.WARNING, "wsecho.storage")
    backend = FlakyUsage()
    committer = GroupCommitter(backend)
    await committer.commit(put("A", "a"))
    backend.fail = True
    for _ in range(2):
        committer.recount()
        await asyncio.wait_for(committer.idle(), 5)
    assert (committer.stored_bytes, committer.recounts) == (2, 0)
    assert caplog.text.count("could not read what all objects store (database gone)") == 1
    backend.fail = False
    committer.recount()
    await asyncio.wait_for(committer.idle(), 5)
    assert committer.recounts == 1
    backend.fail = True  # a new outage: said again
    committer.recount()
    await asyncio.wait_for(committer.idle(), 5)
    assert caplog.text.count("could not read what all objects store (database gone)") == 2
