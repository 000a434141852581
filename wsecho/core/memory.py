"""Memory-pressure eviction without I/O: from a memory reading to how many idle objects to hibernate.

The serve layer reads the memory (the process's RSS, or its cgroup's usage and ``memory.max``)
and hands the reading here with the number of objects in memory; :meth:`PressurePolicy.to_evict`
answers how many of them to hibernate, least recently used first (docs/decisions/0010).

Memory freed by hibernating objects does not show in the reading at once (CPython keeps its
arenas, glibc its heap), so the policy never waits for the reading to fall: above the high-water
mark it estimates what one object holds and asks for enough evictions to reach the low-water
mark, and the next reading (a second later) decides whether more must go.
"""

from __future__ import annotations

import math

import attrs


@attrs.frozen
class Mark:
    """A high- or low-water mark: a number of bytes, or a percentage of the reading's limit."""

    value: float
    percent: bool = False

    def bytes_of(self, limit: int | None) -> int | None:
        """The mark in bytes; None for a percentage of no limit."""
        if not self.percent:
            return int(self.value)
        if limit is None:
            return None
        return int(limit * self.value / 100)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)} bytes"


@attrs.frozen
class MemoryReading:
    """How much memory the server uses, and what a percentage mark is a percentage of."""

    #: Bytes in use: the process's RSS, or its cgroup's ``memory.current`` less reclaimable cache.
    used: int
    #: The cgroup's ``memory.max``, or the machine's memory for RSS; None when unknown.
    limit: int | None
    #: "cgroup" or "rss".
    source: str


@attrs.define(eq=False)
class PressurePolicy:
    """The high- and low-water marks (None: off) and the reading taken before any object existed."""

    high: Mark | None
    low: Mark | None
    #: The first reading's ``used``: what the server holds without objects (None: not taken yet).
    baseline: int | None = None
    #: The reading at the last eviction, until memory is under the low mark again (None).
    evicted_at: int | None = None

    def marks(self, reading: MemoryReading) -> tuple[int | None, int | None]:
        """The marks in bytes for ``reading``: (None, None) when off, low never above high."""
        high = None if self.high is None else self.high.bytes_of(reading.limit)
        if high is None:
            return None, None
        low = None if self.low is None else self.low.bytes_of(reading.limit)
        return high, high if low is None else min(low, high)

    def to_evict(self, reading: MemoryReading, active: int) -> int:
        """How many of the ``active`` objects to hibernate now (0 at or below the high mark).

        What the objects hold is estimated as the reading's growth over the baseline shared
        among them; without growth (the baseline came late), as their share of all of it.
        After an eviction, only growth beyond the reading it was made at asks for more: the
        allocator keeps freed memory for reuse, so a reading that stays up is no reason to
        hibernate every object (the runtime holds the object count where the eviction left it).
        """
        used = reading.used
        if self.baseline is None:
            self.baseline = used
        high, low = self.marks(reading)
        if high is None or low is None or used <= low:
            self.evicted_at = None
            return 0
        if used <= high or active <= 0:
            return 0
        if self.evicted_at is None:
            excess = used - low
        elif used > self.evicted_at:
            excess = used - self.evicted_at
        else:
            return 0
        self.evicted_at = used
        held = used - self.baseline
        per_object = held / active if held > 0 else used / active
        return min(max(math.ceil(excess / per_object), 1), active)
