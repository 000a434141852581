"""A cluster member's bookkeeping without PostgreSQL: a lease store that grants every slot.

tests/cluster runs members against real PostgreSQL; these check what those cannot see from
outside: which worker of this machine should serve an id, the epochs it acts under, what its
status says, and that start() returns holding its slots.
"""

import asyncio
import logging

import pytest

from tests.helpers import until
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
        self.beats = 0
        self.beat = asyncio.Event()
        self.left: BaseException | bool = False

    async def create_schema(self):
        pass

    async def heartbeat(self, ttl, draining):
        self.beats += 1
        self.beat.set()
        return self.members

    async def acquire(self, slots, ttl):
        return {s: 7 for s in slots if s not in self.refused}

    async def release(self, slots):
        self.released += slots

    async def leave(self):
        if isinstance(self.left, BaseException):
            raise self.left
        self.left = True

    async def close(self):
        self.closed = True

    def forget_connection(self):
        pass


def member(name="M#0", members=(), ttl=2.0, lost=None, gained=None, clock=lambda: 100.0):
    on_lost = (lambda slots, why: lost.append((list(slots), why))) if lost is not None else (lambda *_: None)
    on_gained = gained.append if gained is not None else None
    return ClusterMember(GrantingStore(name, members), ttl=ttl, clock=clock, on_lost=on_lost, on_gained=on_gained)


async def next_beat(store, timeout=10.0):
    store.beat.clear()
    await asyncio.wait_for(store.beat.wait(), timeout)


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


@pytest.mark.gen_test
async def test_a_member_renews_every_third_of_a_ttl_without_being_nudged():
    m = member(ttl=0.06)
    await m.start()
    try:
        for _ in range(3):  # the loop outlives the wait's timeouts
            await next_beat(m.store)
        assert m.ready()
    finally:
        await m.close()


@pytest.mark.gen_test
async def test_a_nudge_runs_one_round_not_a_round_after_every_other():
    m = member(ttl=60.0)  # the next timed round is 20 s away
    await m.start()
    try:
        assert m.store.beats == 1
        m.nudge()
        await next_beat(m.store)
        for _ in range(50):  # let a loop that was not reset run rounds back to back
            await asyncio.sleep(0)
        assert m.store.beats == 2
    finally:
        await m.close()


@pytest.mark.gen_test
async def test_the_slots_taken_are_handed_to_on_gained_and_logged(caplog):
    gained = []
    m = member("M#0", gained=gained)
    m.store.refused = {5}
    with caplog.at_level(logging.INFO, logger="wsecho.cluster"):
        await m.round()
        assert gained == [sorted(set(range(SLOTS)) - {5})]
        assert f"took the leases of {SLOTS - 1} slots" in caplog.messages
        m.store.refused = set()  # the other member let slot 5 go
        await m.round()
        assert gained[-1] == [5]
        assert caplog.messages[-1] == "took the leases of 1 slot"
        await m.round()  # nothing new: nothing handed over
        assert len(gained) == 2


@pytest.mark.gen_test
async def test_a_lease_table_that_answers_again_is_logged_once(caplog):
    m = member()
    await m.round()
    m.last_error = "connection refused"  # (what the loop records when a round fails)
    with caplog.at_level(logging.INFO, logger="wsecho.cluster"):
        await m.round()
        await m.round()
    assert caplog.messages.count("the lease table answers again") == 1


@pytest.mark.gen_test
async def test_a_closed_member_no_longer_drops_slots_when_their_proof_runs_out():
    now = [100.0]
    lost = asyncio.Queue()
    m = ClusterMember(
        GrantingStore("M#0"), ttl=0.2, clock=lambda: now[0], on_lost=lambda slots, why: lost.put_nowait(why)
    )
    await m.start()
    await m.close()
    now[0] += 10  # every proof ran out; a proof timer still armed would drop the slots
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lost.get(), 0.2)  # 20 of the timer's periods (ttl / 20)


@pytest.mark.gen_test
async def test_the_proof_is_checked_again_after_dropping_slots_raised():
    now = [100.0]
    lost = asyncio.Queue()

    def on_lost(slots, why):
        lost.put_nowait(sorted(slots))
        if lost.qsize() == 1:
            raise RuntimeError("the runtime failed to drop them")

    m = ClusterMember(GrantingStore("M#0"), ttl=0.2, clock=lambda: now[0], on_lost=on_lost)
    await m.start()
    try:
        now[0] += 10  # every proof ran out: the timer drops them, and the drop raises
        assert await asyncio.wait_for(lost.get(), 5)
        m.table.confirm({7: 1}, now[0])  # a slot taken again runs out again later ...
        now[0] += 10
        assert await asyncio.wait_for(lost.get(), 5) == [7]  # ... and the timer still checks
    finally:
        await m.close()


@pytest.mark.gen_test
async def test_a_started_member_waits_settled_at_once():
    m = member("M#0", ["N#0"])
    await m.start()
    try:
        assert await m.wait_settled(timeout=5)
    finally:
        await m.close()


@pytest.mark.gen_test
async def test_a_closed_member_runs_no_more_rounds():
    m = member(ttl=60.0)
    await m.start()
    await m.close()
    m.nudge()
    with pytest.raises(TimeoutError):
        await next_beat(m.store, timeout=0.2)


class BlockingStore(GrantingStore):
    """A heartbeat after the first waits until cancelled: a round stuck on the database."""

    def __init__(self, name):
        super().__init__(name)
        self.events = []
        self.stuck = asyncio.Event()

    async def heartbeat(self, ttl, draining):
        if self.beats:
            self.stuck.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.events.append("round cancelled")
                raise
        return await super().heartbeat(ttl, draining)

    async def close(self):
        self.events.append("store closed")
        await super().close()


@pytest.mark.gen_test
async def test_a_member_closes_its_store_only_after_its_round_has_stopped():
    store = BlockingStore("M#0")
    m = ClusterMember(store, ttl=60.0, clock=lambda: 100.0, on_lost=lambda *_: None)
    await m.start()
    m.nudge()
    await asyncio.wait_for(store.stuck.wait(), 10)
    await m.close()
    assert store.events == ["round cancelled", "store closed"]


@pytest.mark.gen_test
async def test_a_member_is_not_ready_until_it_has_held_every_slot_it_should_own():
    m = member()
    m.store.refused = {5}  # another member's commit still holds slot 5
    await m.round()
    assert not m.ready()
    assert not await m.wait_settled(timeout=0.05)
    m.store.refused = set()
    await m.round()
    assert m.ready()
    assert await m.wait_settled(timeout=5)


@pytest.mark.gen_test
async def test_draining_tells_the_lease_table_and_survives_a_table_that_cannot_answer():
    m = member()
    await m.round()
    await m.drain()
    assert m.store.left is True
    m = member()
    await m.round()
    m.store.left = OSError("connection refused")
    await m.drain()  # a clean stop goes on: the leases run out on their own
    assert not m.ready()


@pytest.mark.gen_test
async def test_a_member_no_load_balancer_checks_gives_its_slots_up_until_checks_return(caplog):
    now, probed = [100.0], [100.0]
    lost = []
    m = ClusterMember(
        GrantingStore("M#0", ["N#0"]),
        ttl=2.0,
        clock=lambda: now[0],
        on_lost=lambda slots, why: lost.append((sorted(slots), why)),
        probed_at=lambda: probed[0],
        probe_timeout=1.0,
    )
    with caplog.at_level(logging.INFO, logger="wsecho.cluster"):
        await m.round()
        mine = sorted(m.desired)
        assert mine
        assert caplog.messages[:1] == ["members: M#0, N#0 (2 serving members)"]
        assert not any("load balancer" in line for line in caplog.messages)  # it did not start draining
        now[0] += 1.5  # no check for longer than the probe timeout
        await m.round()
        assert lost == [(mine, "the slots moved to another member")]
        assert m.desired == frozenset()
        assert not m.ready()
        assert "no load balancer has checked this process for 1s: giving its slots to the others" in caplog.messages
        probed[0] = now[0]  # checks return
        await m.round()
        assert sorted(m.desired) == mine
        assert m.ready()
        assert "a load balancer checks this process again: taking a share of the slots" in caplog.messages


class FailingStore(GrantingStore):
    """A heartbeat that raises ``failure``, or never answers when it is "hang"."""

    def __init__(self, name):
        super().__init__(name)
        self.failure = None
        self.forgotten = 0

    async def heartbeat(self, ttl, draining):
        if self.failure == "hang":
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return await super().heartbeat(ttl, draining)

    def forget_connection(self):
        self.forgotten += 1


@pytest.mark.gen_test(timeout=30)
async def test_a_failing_or_silent_lease_table_is_recorded_logged_once_and_the_loop_goes_on(caplog):
    store = FailingStore("M#0")
    m = ClusterMember(store, ttl=0.3, clock=lambda: 100.0, on_lost=lambda *_: None)
    await m.start()
    try:
        with caplog.at_level(logging.INFO, logger="wsecho.cluster"):
            store.failure = OSError("connection refused")
            m.nudge()
            await until(lambda: m.last_error == "connection refused", timeout=10)
            assert not m.ready()
            assert store.forgotten == 0
            store.failure = "hang"  # a round is bounded by a third of the ttl
            await until(lambda: m.last_error == "no answer within 0.1s", timeout=10)
            assert store.forgotten >= 1  # the next round opens a new connection
            store.failure = None
            await until(lambda: m.last_error is None, timeout=10)
            assert m.ready()
        failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert failures == [
            "cannot renew the slot leases: connection refused; slots are dropped as their proof runs out"
        ]
    finally:
        await m.close()


@pytest.mark.gen_test
async def test_without_a_probe_timeout_or_a_probe_clock_a_member_never_counts_itself_unreachable():
    for probed_at, probe_timeout in [(lambda: 0.0, 0.0), (None, 1.0)]:
        m = ClusterMember(
            GrantingStore("M#0"),
            ttl=2.0,
            clock=lambda: 100.0,  # a hundred seconds after the last check, if one counted
            on_lost=lambda *_: None,
            probed_at=probed_at,
            probe_timeout=probe_timeout,
        )
        await m.round()
        assert m.ready()
        assert len(m.desired) == SLOTS
