"""Which idle objects are due for hibernation, at a cost that grows with the due ones only.

Sans-IO like the rest of the core: callers pass ``now``. Objects with the same
timeout become idle in time order, so each timeout gets one insertion-ordered
dict used as a queue: the oldest idle object is always first, a sweep stops at
the first one that is not due yet, and becoming idle again moves an object to
the end in O(1). A sweep therefore looks at the due objects plus one per
distinct timeout, never at every object.

The same order makes the index a least-recently-used list of the objects that may hibernate
(an object leaves its turn last-used and is touched then): :meth:`IdleIndex.oldest` is the
least recently used, found among one head per timeout (``--max-active-objects`` and memory
pressure, docs/decisions/0010).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import attrs

K = TypeVar("K", bound=Hashable)


@attrs.define(eq=False)
class IdleIndex(Generic[K]):
    """Idle objects, ordered by the time they became idle, one queue per timeout."""

    _queues: dict[float, dict[K, float]] = attrs.field(factory=dict, alias="_queues")
    _timeout_of: dict[K, float] = attrs.field(factory=dict, alias="_timeout_of")
    #: How many entries the last ``pop_due`` looked at (due ones plus one per queue).
    last_scanned: int = 0

    def __len__(self) -> int:
        return len(self._timeout_of)

    def __contains__(self, key: object) -> bool:
        return key in self._timeout_of

    def touch(self, key: K, timeout: float, since: float) -> None:
        """Record that ``key`` is idle since ``since``; it is due at ``since + timeout``.

        Calls must come with non-decreasing ``since`` values for one timeout
        (they do: the runtime reads one monotonic clock).
        """
        queue = self._queues.get(timeout)
        if queue is not None and self._timeout_of.get(key) == timeout:
            if next(reversed(queue)) is key:
                queue[key] = since  # already last (a busy object): only its time changes
            else:
                del queue[key]  # an object idle again moves to the end
                queue[key] = since
            return
        # discard() can only empty the key's queue of another timeout: ``queue`` is still current
        self.discard(key)
        if queue is None:
            queue = self._queues[timeout] = {}
        queue[key] = since
        self._timeout_of[key] = timeout

    def discard(self, key: K) -> None:
        timeout = self._timeout_of.pop(key, None)
        if timeout is not None:
            queue = self._queues[timeout]
            del queue[key]
            if not queue:
                del self._queues[timeout]

    def oldest(self) -> K | None:
        """The key idle for the longest (the smallest ``since`` of any timeout), or None."""
        heads = (next(iter(queue.items())) for queue in self._queues.values())
        head = min(heads, key=lambda item: item[1], default=None)
        return None if head is None else head[0]

    def pop_due(self, now: float) -> list[K]:
        """Remove and return every key idle for at least its timeout at ``now``, oldest first."""
        due: list[K] = []
        scanned = 0
        for timeout in list(self._queues):
            queue = self._queues[timeout]
            deadline = now - timeout
            for key, since in queue.items():
                scanned += 1
                if since > deadline:
                    break
                due.append(key)
        self.last_scanned = scanned
        for key in due:
            self.discard(key)
        return due
