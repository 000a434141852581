"""The idle index: due objects come out oldest first, at a cost set by the due ones."""

import tracemalloc

from wsecho.core.idle import IdleIndex


def test_pop_due_returns_only_objects_idle_long_enough():
    idx = IdleIndex()
    idx.touch("a", 10, 0.0)
    idx.touch("b", 10, 1.0)
    idx.touch("c", 10, 2.0)
    assert idx.pop_due(10.5) == ["a"]
    assert idx.pop_due(12.0) == ["b", "c"]
    assert idx.pop_due(100.0) == []
    assert len(idx) == 0


def test_touch_moves_an_object_to_the_back():
    idx = IdleIndex()
    idx.touch("a", 10, 0.0)
    idx.touch("b", 10, 1.0)
    idx.touch("a", 10, 5.0)
    assert idx.pop_due(11.0) == ["b"]
    assert "a" in idx


def test_discard_and_several_timeouts():
    idx = IdleIndex()
    idx.touch("short", 1, 0.0)
    idx.touch("long", 100, 0.0)
    idx.touch("gone", 1, 0.0)
    idx.discard("gone")
    idx.discard("never there")
    assert idx.pop_due(2.0) == ["short"]
    assert idx.pop_due(100.0) == ["long"]


def test_same_instant_is_not_a_collision():
    # Two objects idle since the very same moment are both tracked and both due.
    idx = IdleIndex()
    idx.touch("a", 10, 3.0)
    idx.touch("b", 10, 3.0)
    assert len(idx) == 2
    assert idx.pop_due(13.0) == ["a", "b"]


def test_a_sweep_looks_only_at_the_due_objects():
    idx = IdleIndex()
    for i in range(100_000):
        idx.touch(i, 10, float(i) / 1000)
    assert idx.pop_due(5.0) == []
    assert idx.last_scanned == 1
    due = idx.pop_due(10.0 + 0.009)
    assert due == list(range(10))
    # ten due plus the first one that is not
    assert idx.last_scanned == 11
    assert len(idx) == 100_000 - 10


def test_touching_the_last_key_again_moves_its_due_time():
    # The fast path (the key is already last in its queue) must still record the new time.
    index = IdleIndex()
    index.touch("a", 10, since=0)
    index.touch("a", 10, since=5)
    assert index.pop_due(12) == []
    assert index.pop_due(15) == ["a"]


def test_a_key_that_changes_timeout_leaves_its_old_queue():
    index = IdleIndex()
    index.touch("a", 10, since=0)
    index.touch("b", 10, since=0)
    index.touch("a", 20, since=1)
    assert index.pop_due(15) == ["b"]
    assert index.pop_due(21) == ["a"]
    assert len(index) == 0
    assert index.last_scanned == 1


def test_nothing_is_scanned_before_the_first_sweep():
    assert IdleIndex().last_scanned == 0


def test_an_index_emptied_of_many_timeouts_keeps_no_memory_for_them():
    # Every distinct timeout gets a queue; a queue that empties must go too, or an index that
    # saw many timeouts come and go (objects with per-class timeouts, reconfigured) grows forever.
    index = IdleIndex()
    index.touch("warm-up", 1, since=0)
    index.discard("warm-up")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for timeout in range(10_000):
            index.touch(timeout, timeout, since=0)
        index.pop_due(10_000)
        for timeout in range(10_000, 20_000):
            index.touch(timeout, timeout, since=0)
            index.discard(timeout)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(index) == 0
    assert kept < 100_000  # 20,000 empty queues left behind hold megabytes


def test_oldest_is_the_least_recently_idle_key_of_any_timeout():
    idx = IdleIndex()
    assert idx.oldest() is None
    idx.touch("long", 100, 2.0)
    idx.touch("short", 1, 3.0)
    idx.touch("first", 100, 1.0 + 5.0)  # after "long" in its queue
    assert idx.oldest() == "long"
    idx.touch("long", 100, 7.0)  # used again: now the most recent
    assert idx.oldest() == "short"
    idx.discard("short")
    assert idx.oldest() == "first"
