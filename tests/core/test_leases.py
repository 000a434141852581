"""The pure part of the slot leases: who should own a slot, and how long a lease is provable."""

from collections import Counter

import pytest

from wsecho.core.leases import DRIFT_MARGIN, LeaseTable, desired_slots, rendezvous_owner
from wsecho.core.placement import SLOTS


def test_every_member_computes_the_same_owner_and_the_slots_spread_evenly():
    members = ["a", "b", "c"]
    owners = [rendezvous_owner(s, members) for s in range(SLOTS)]
    assert owners == [rendezvous_owner(s, list(reversed(members))) for s in range(SLOTS)]
    counts = Counter(owners)
    assert set(counts) == set(members)
    assert all(abs(n - SLOTS / 3) < SLOTS * 0.05 for n in counts.values())
    assert rendezvous_owner(0, []) is None


@pytest.mark.parametrize("change", ["join", "leave"])
def test_a_member_joining_or_leaving_moves_only_its_own_share(change):
    before_members = ["a", "b", "c"] if change == "leave" else ["a", "b"]
    after_members = ["a", "b"] if change == "leave" else ["a", "b", "c"]
    before = [rendezvous_owner(s, before_members) for s in range(SLOTS)]
    after = [rendezvous_owner(s, after_members) for s in range(SLOTS)]
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert moved  # c's share moved...
    assert all("c" in pair for pair in moved)  # ... and nothing else did
    assert len(moved) < SLOTS * 0.4


def test_desired_slots_partition_the_slots():
    members = ["m1", "m2", "m3"]
    shares = [desired_slots(m, members) for m in members]
    assert sum(len(s) for s in shares) == SLOTS
    assert frozenset().union(*shares) == frozenset(range(SLOTS))
    assert desired_slots("alone", []) == frozenset(range(SLOTS))


def test_a_lease_is_provable_until_the_send_time_plus_the_ttl_minus_the_margin():
    table = LeaseTable(ttl=10.0)
    table.confirm({7: 3, 8: 1}, sent_at=100.0)
    deadline = 100.0 + 10.0 * (1 - DRIFT_MARGIN)
    assert table.provable(7, deadline - 0.001)
    assert not table.provable(7, deadline)
    assert not table.provable(9, 100.0)
    assert table.epoch(7) == 3
    assert table.epoch(9) is None
    assert table.expired(deadline - 0.001) == []
    assert table.expired(deadline) == [7, 8]
    table.confirm({7: 3}, sent_at=105.0)  # renewed: only 8 runs out
    assert table.expired(deadline) == [8]
    table.drop([8])
    assert table.slots() == frozenset({7})


def test_every_version_computes_the_same_owner_of_a_slot():
    # A rolling restart runs two versions side by side: if they disagreed on who should own a
    # slot, each would keep taking it from the other. The score is blake2b-64 of "slot\0member".
    assert [rendezvous_owner(s, ["a", "b", "c"]) for s in range(12)] == list("bcaabbbaccab")
