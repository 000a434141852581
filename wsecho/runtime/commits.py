"""Group commit: batches of many objects share one backend transaction and one fsync."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from wsecho.backends.base import Backend
from wsecho.core.batches import Batch


class GroupCommitter:
    """Commits batches; those that arrive while a commit runs share the next one (one fsync)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._waiting: list[tuple[list[Batch], asyncio.Future[int]]] = []
        self._task: asyncio.Future[None] | None = None
        #: How many backend commits ran, and how many batches they carried.
        self.commits = 0
        self.batches = 0
        #: Bytes stored by all objects, as committed (read at start, then kept by each commit).
        self.stored_bytes = 0
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
            while self._waiting:
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
                    self.stored_bytes += sum(changes.values())
                    for batches, done in group:
                        # Each object's change goes to the first waiter with a batch of it.
                        share = sum(changes.pop(batch.object, 0) for batch in batches)
                        if not done.done():
                            done.set_result(share)
        finally:
            self._task = None

    def _health(self, failure: BaseException | None) -> None:
        was_failing = self.failure is not None
        self.failure = failure
        if was_failing != (failure is not None) and self.on_health is not None:
            self.on_health(failure)

    async def idle(self) -> None:
        """Wait until every submitted batch is committed."""
        while self._task is not None:
            await asyncio.shield(self._task)
