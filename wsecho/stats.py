"""What the runtime counts beyond plain counters: labelled counts and latency histograms.

Sans-IO and dependency-free; the admin listener turns them into Prometheus metrics.
"""

from __future__ import annotations

import bisect
from collections import Counter

import attrs

#: Wake latency buckets in seconds: 50 µs to 1 s.
WAKE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


@attrs.define(eq=False)
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense, without the dependency."""

    buckets: tuple[float, ...]
    counts: list[int] = attrs.field()
    total: float = 0.0
    count: int = 0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound, observations <= it), ..., ("+Inf", all)]``."""
        out, running = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@attrs.define(eq=False)
class Stats:
    """Labelled counts of one runtime."""

    #: Final events by close code (1006 for dropped connections, 1009/1007/1002 for failures).
    closed_by_code: Counter[int] = attrs.field(factory=Counter)
    #: Handler exceptions by handler name (fetch, web_socket_message, alarm, ...).
    handler_errors: Counter[str] = attrs.field(factory=Counter)
    #: Instances dropped, by why: idle (hibernation), abort, event_timeout, storage_error.
    evictions: Counter[str] = attrs.field(factory=Counter)
    #: put() calls refused by a storage quota: "object" or "total".
    quota_refusals: Counter[str] = attrs.field(factory=Counter)
    #: From an event's arrival at a hibernated object to the start of its handler.
    wake_latency: Histogram = attrs.field(factory=lambda: Histogram(WAKE_BUCKETS))
