"""Group commit: batches of many objects share one backend transaction and one fsync."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from wsecho.backends.base import Backend
from wsecho.core.batches import Batch

log = logging.getLogger("wsecho.storage")

#: With a total quota, a process re-reads the total of all processes (other workers and
#: cluster members store into the same database) once it has committed 1/RECOUNT_SHARE of the
#: quota since its last reading, and after every commit group that grows once it is within
#: that much of the quota: together, N processes store at most (N - 1) x quota/RECOUNT_SHARE
#: more than one process would (docs/operations.md, --max-storage).
RECOUNT_SHARE = 64


class GroupCommitter:
    """Commits batches; those that arrive while a commit runs share the next one (one fsync)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._waiting: list[tuple[list[Batch], asyncio.Future[int]]] = []
        self._task: asyncio.Future[None] | None = None
        #: How many backend commits ran, and how many batches they carried.
        self.commits = 0
        self.batches = 0
        #: Bytes stored by all objects, as committed (read at start, then kept by each commit
        #: and read again by each recount: other processes may share the database).
        self.stored_bytes = 0
        #: The total quota (``--max-storage``) that recounts keep honest; None: no recounts.
        self.quota: int | None = None
        #: How many times the total was read again.
        self.recounts = 0
        #: Bytes this process's commits added since the total was last read.
        self._grown = 0
        self._recount = False
        self._recount_failed = False
        #: The error of the last commit if it failed, None once a commit succeeds again.
        self.failure: BaseException | None = None
        #: Called with the failure when commits start failing, and with None when they recover.
        self.on_health: Callable[[BaseException | None], None] | None = None

    async def commit(self, batch: Batch) -> int:
        """Commit ``batch``; return by how many bytes its object's usage changed."""
        return await self.commit_many([batch])

    async def commit_many(self, batches: list[Batch]) -> int:
        """Commit ``batches`` together, in one transaction with whatever else is waiting."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((batches, done))
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        try:
            while self._waiting or self._recount:
                if self._recount:
                    # Between two commit groups: no commit of this process runs during the
                    # reading, so the total counts each of them exactly once.
                    await self._read_total()
                    continue
                group, self._waiting = self._waiting, []
                try:
                    changes = await self.backend.commit([batch for batches, _ in group for batch in batches])
                except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                    self._health(exc)
                    for _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    self._health(None)
                    self.commits += 1
                    self.batches += sum(len(batches) for batches, _ in group)
                    growth = sum(changes.values())
                    self.stored_bytes += growth
                    if self.quota is not None and growth > 0:
                        self._grew(self.quota, growth)
                    for batches, done in group:
                        # Each object's change goes to the first waiter with a batch of it.
                        share = sum(changes.pop(batch.object, 0) for batch in batches)
                        if not done.done():
                            done.set_result(share)
        finally:
            self._task = None

    def _grew(self, quota: int, growth: int) -> None:
        share = quota // RECOUNT_SHARE  # 0 under 64 bytes of quota: every growing commit recounts
        self._grown += growth
        if self._grown >= share or self.stored_bytes + share > quota:
            self._recount = True

    def recount(self) -> None:
        """Read again, between two commit groups and soon, what all processes store."""
        self._recount = True
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())

    async def _read_total(self) -> None:
        self._recount = False
        try:
            total = await self.backend.usage(None)
        except Exception as exc:  # noqa: BLE001 - the count stays as it was; the next recount tries again
            if not self._recount_failed:
                log.warning("could not read what all objects store (%s); the quota counts from the last reading", exc)
            self._recount_failed = True
            return
        self._recount_failed = False
        self.stored_bytes = total
        self._grown = 0
        self.recounts += 1

    def _health(self, failure: BaseException | None) -> None:
        was_failing = self.failure is not None
        self.failure = failure
        if was_failing != (failure is not None) and self.on_health is not None:
            self.on_health(failure)

    async def idle(self) -> None:
        """Wait until every submitted batch is committed."""
        while self._task is not None:
            await asyncio.shield(self._task)
