"""A cluster member's bookkeeping without PostgreSQL: a lease store that grants every slot.

tests/cluster runs members against real PostgreSQL; these check what those cannot see from
outside: which worker of this machine should serve an id, the epochs it acts under, what its
status says, and that start() returns holding its slots.
"""

import pytest

from wsecho.core.leases import rendezvous_owner
from wsecho.core.placement import SLOTS, slot_of
from wsecho.runtime.cluster import ClusterMember, machine_of


class GrantingStore:
    """Every member in ``members`` is alive; every slot asked for is granted at epoch 7."""

    def __init__(self, name, members=()):
        self.member = self.name = name
        self.members = [name, *members]
        self.statement_timeout = 10.0
        self.closed = False
        self.refused: set[int] = set()
        self.released: list[int] = []

    async def create_schema(self):
        pass

    async def heartbeat(self, ttl, draining):
        return self.members

    async def acquire(self, slots, ttl):
        return {s: 7 for s in slots if s not in self.refused}

    async def release(self, slots):
        self.released += slots

    async def leave(self):
        pass

    async def close(self):
        self.closed = True

    def forget_connection(self):
        pass


def member(name="M#0", members=(), ttl=2.0, lost=None):
    on_lost = (lambda slots, why: lost.append((list(slots), why))) if lost is not None else (lambda *_: None)
    return ClusterMember(GrantingStore(name, members), ttl=ttl, clock=lambda: 100.0, on_lost=on_lost)


def an_id_owned_by(owner, members):
    for i in range(SLOTS):
        hex_id = f"{i:08x}" + "0" * 56
        if rendezvous_owner(slot_of(hex_id), members) == owner:
            return hex_id
    raise AssertionError(owner)


@pytest.mark.parametrize(
    ("name", "machine"), [("m1#3", "m1"), ("m1", "m1"), ("m1#x", "m1#x"), ("#3", "#3"), ("a#b#2", "a#b")]
)
def test_a_workers_machine_is_its_name_without_the_index(name, machine):
    assert machine_of(name) == machine


def test_a_member_bounds_each_statement_by_a_quarter_of_the_ttl():
    assert member(ttl=2.0).store.statement_timeout == 0.5
    assert member(ttl=100.0).store.statement_timeout == 10.0


@pytest.mark.gen_test
async def test_the_owner_is_a_worker_of_this_machine_or_another_machines_member_or_none():
    everyone = {"M#0", "M#1", "N#1"}
    m = member("M#0", ["M#1", "N#1"])
    await m.round()
    assert m.owner(an_id_owned_by("M#1", everyone)) == 1  # hand it to worker 1 of this machine
    assert m.owner(an_id_owned_by("M#0", everyone)) is None  # its own
    assert m.owner(an_id_owned_by("N#1", everyone)) == "N#1"  # another machine's: the peer channel
    assert m.expected_owner(an_id_owned_by("N#1", everyone)) == "N#1"


@pytest.mark.gen_test
async def test_start_returns_holding_its_slots_and_acts_under_their_epochs():
    m = member("M#0", ["N#0"])
    assert m.status() == "holds 0 of the 0 slots it should own among 0 members"
    await m.start()
    try:
        assert m.ready()
        mine = sorted(m.desired)
        assert 0 < len(mine) < SLOTS
        assert m.status() == f"holds {len(mine)} of the {len(mine)} slots it should own among 2 members"
        other = next(s for s in range(SLOTS) if s not in m.desired)
        assert m.epochs([mine[0], other]) == {mine[0]: 7}
        m.last_error = "connection refused"
        assert m.status() == "cannot reach the lease table: connection refused"
    finally:
        await m.close()
    assert m.store.closed


@pytest.mark.gen_test
async def test_a_member_that_never_started_closes_its_store():
    m = member()
    await m.close()
    assert m.store.closed


@pytest.mark.gen_test
async def test_a_round_drops_slots_taken_or_moved_and_recovers_from_an_error():
    lost = []
    m = member("M#0", lost=lost)
    await m.round()
    assert m.table.slots() == frozenset(range(SLOTS))  # alone: every slot
    m.store.refused = {5}  # another member holds slot 5 now
    await m.round()
    assert lost == [([5], "another member holds their leases")]
    assert 5 not in m.table.slots()
    m.store.members.append("N#0")  # a member joins: its share moves to it
    await m.round()
    moved = sorted(set(range(SLOTS)) - m.desired - {5})
    assert lost[-1] == (moved, "the slots moved to another member")
    assert m.store.released == moved
    m.last_error = "connection refused"  # (what the loop records when a round fails)
    await m.round()
    assert m.last_error is None
    assert m.ready()
    await m.drain()
    assert not m.ready()
    assert lost[-1] == (sorted(m.desired - {5}), "this process is stopping")
