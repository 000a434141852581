"""Which alarms are due: one per object, sans-IO (callers pass ``now_ms``, epoch milliseconds).

A heap keyed by due time with lazy deletion: setting, retrying or removing an
alarm is O(log n), and popping the due ones costs what they number.
"""

from __future__ import annotations

import heapq
import itertools

import attrs

#: A failed ``alarm()`` is retried after 2, 4, 8, 16, 32 and 64 seconds, then given up.
RETRY_BASE_MS = 2_000
MAX_RETRIES = 6


def retry_delay_ms(retry: int) -> int:
    """How long to wait before retry number ``retry`` (1-based)."""
    return int(RETRY_BASE_MS * 2 ** (retry - 1))


@attrs.frozen
class AlarmRow:
    """A stored alarm: which object (enough to find it again) and when, in epoch ms."""

    object: str
    namespace: str
    id: str
    name: str | None
    at_ms: int


@attrs.define(eq=False)
class Due:
    row: AlarmRow
    #: 0 for the first delivery, then 1, 2, ... for retries.
    retries: int


@attrs.define(eq=False)
class AlarmSchedule:
    _entries: dict[str, tuple[int, AlarmRow, int]] = attrs.field(factory=dict, alias="_entries")
    _heap: list[tuple[int, int, str]] = attrs.field(factory=list, alias="_heap")
    _seq: itertools.count[int] = attrs.field(factory=itertools.count, alias="_seq")

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, row: AlarmRow, at_ms: int | None = None, retries: int = 0) -> None:
        """Schedule ``row`` (at ``at_ms``, default its own time); replaces the object's alarm."""
        when = row.at_ms if at_ms is None else at_ms
        self._entries[row.object] = (when, row, retries)
        heapq.heappush(self._heap, (when, next(self._seq), row.object))

    def remove(self, obj: str) -> None:
        self._entries.pop(obj, None)

    def get(self, obj: str) -> int | None:
        """When the object's alarm goes off next (a retry included), or None."""
        entry = self._entries.get(obj)
        return None if entry is None else entry[0]

    def next_at(self) -> int | None:
        while self._heap:
            when, _, obj = self._heap[0]
            entry = self._entries.get(obj)
            if entry is not None and entry[0] == when:
                return when
            heapq.heappop(self._heap)  # stale: replaced or removed
        return None

    def pop_due(self, now_ms: int) -> list[Due]:
        """Remove and return every alarm due at ``now_ms``, earliest first."""
        due = []
        while (when := self.next_at()) is not None and when <= now_ms:
            _, _, obj = heapq.heappop(self._heap)
            _, row, retries = self._entries.pop(obj)
            due.append(Due(row, retries))
        return due
