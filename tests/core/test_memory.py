"""Memory-pressure eviction's arithmetic: marks, the estimate, and no ratchet on a reading
that stays up after an eviction (docs/decisions/0010)."""

import pytest

from wsecho.core.memory import Mark, MemoryReading, PressurePolicy

MB = 1_000_000


def reading(used, limit=100 * MB):
    return MemoryReading(used, limit, "cgroup")


def test_marks_are_bytes_or_percentages_of_the_limit_and_low_is_never_above_high():
    policy = PressurePolicy(Mark(80, percent=True), Mark(70, percent=True))
    assert policy.marks(reading(0)) == (80 * MB, 70 * MB)
    assert policy.marks(reading(0, limit=None)) == (None, None)  # a percentage of nothing: off
    assert PressurePolicy(Mark(50 * MB), Mark(90, percent=True)).marks(reading(0)) == (50 * MB, 50 * MB)
    assert PressurePolicy(Mark(50 * MB), None).marks(reading(0)) == (50 * MB, 50 * MB)
    assert PressurePolicy(None, Mark(10 * MB)).marks(reading(0)) == (None, None)
    assert str(Mark(80, percent=True)) == "80%"
    assert str(Mark(1024)) == "1024 bytes"


def test_nothing_is_evicted_at_or_below_the_high_mark():
    policy = PressurePolicy(Mark(80 * MB), Mark(70 * MB), baseline=10 * MB)
    assert policy.to_evict(reading(80 * MB), 100) == 0
    assert policy.to_evict(reading(81 * MB), 0) == 0  # nothing in memory to evict


def test_the_estimate_shares_the_growth_over_the_baseline_among_the_objects():
    policy = PressurePolicy(Mark(80 * MB), Mark(70 * MB), baseline=10 * MB)
    # 80 MB over the baseline in 40 objects: 2 MB each; 20 MB over the low mark: 10 objects
    assert policy.to_evict(reading(90 * MB), 40) == 10
    policy = PressurePolicy(Mark(80 * MB), Mark(70 * MB), baseline=95 * MB)  # no growth to share
    assert policy.to_evict(reading(90 * MB), 90) == 20  # 1 MB each: all of it shared
    policy = PressurePolicy(Mark(80 * MB), Mark(0.001 * MB), baseline=0)
    assert policy.to_evict(reading(90 * MB), 3) == 3  # never more than there are


def test_the_first_reading_is_the_baseline():
    policy = PressurePolicy(Mark(80 * MB), Mark(70 * MB))
    assert policy.to_evict(reading(20 * MB), 0) == 0
    assert policy.baseline == 20 * MB


def test_after_an_eviction_only_new_growth_asks_for_more():
    policy = PressurePolicy(Mark(80 * MB), Mark(70 * MB), baseline=10 * MB)
    assert policy.to_evict(reading(90 * MB), 40) == 10
    # the allocator keeps what was freed: the same reading asks for nothing more ...
    assert policy.to_evict(reading(90 * MB), 30) == 0
    assert policy.to_evict(reading(85 * MB), 30) == 0
    # ... growth beyond the reading at the eviction asks for its share: 6 MB at 86/30 MB each
    assert policy.to_evict(reading(96 * MB), 30) == 3
    # under the low mark, the next time above the high mark counts from the low mark again
    assert policy.to_evict(reading(60 * MB), 28) == 0
    assert policy.evicted_at is None
    assert policy.to_evict(reading(90 * MB), 40) == 10


@pytest.mark.parametrize("used", [81 * MB, 100 * MB])
def test_at_least_one_object_goes_above_the_high_mark(used):
    policy = PressurePolicy(Mark(80 * MB), Mark(80 * MB), baseline=0)
    assert policy.to_evict(reading(used), 1000) >= 1
