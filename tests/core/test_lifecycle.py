"""The sans-IO lifecycle core: every legal row and every illegal pair of both tables."""

import itertools
from collections import deque

import pytest

from wsecho.core.errors import InvalidStateError, NoTransitionError
from wsecho.core.lifecycle import (
    OBJECT_TRANSITIONS,
    SOCKET_TRANSITIONS,
    BecameIdle,
    CloseSockets,
    Deliver,
    DropEvents,
    DropInstance,
    Final,
    ObjectInput,
    ObjectLifecycle,
    ObjectState,
    RunConstructor,
    SocketInput,
    SocketState,
    socket_transition,
)

A, H, W = ObjectState.ACTIVE, ObjectState.HIBERNATING, ObjectState.WAKING


def fire(lc, what, now=5.0):
    """Feed ``what`` to ``lc`` through its public method."""
    if what is ObjectInput.EVENT_ARRIVED:
        return lc.event_arrived("new", now)
    if what is ObjectInput.CONSTRUCTOR_RETURNED:
        return lc.constructed(now)
    if what is ObjectInput.CONSTRUCTOR_RAISED:
        return lc.construct_failed(now)
    if what is ObjectInput.TURN_ENDED:
        return lc.turn_ended(now)
    if what is ObjectInput.EVICT:
        return lc.evict(now)
    if what is ObjectInput.RESET:
        return lc.reset(now)
    raise AssertionError(what)


def prepared(state, what):
    """A lifecycle in ``state`` that meets the input's precondition, with one queued event."""
    lc = ObjectLifecycle(state=state)
    if what is ObjectInput.TURN_ENDED:
        lc.current = "running"
    if what is not ObjectInput.EVICT:
        lc.queue.append("queued")
    return lc


# (state, input) -> (next state, effects) with one queued event "queued" and,
# for TURN_ENDED, the event "running" in its turn. Written out by hand so that
# a change to the table has to change this too.
EXPECTED = {
    (H, ObjectInput.EVENT_ARRIVED): (W, [RunConstructor()], ["queued", "new"]),
    (W, ObjectInput.EVENT_ARRIVED): (W, [], ["queued", "new"]),
    (A, ObjectInput.EVENT_ARRIVED): (A, [Deliver("queued")], ["new"]),
    (W, ObjectInput.CONSTRUCTOR_RETURNED): (A, [Deliver("queued")], []),
    (W, ObjectInput.CONSTRUCTOR_RAISED): (
        H,
        [CloseSockets(1011, "Durable Object reset"), DropEvents(("queued",))],
        [],
    ),
    (A, ObjectInput.TURN_ENDED): (A, [Deliver("queued")], []),
    (A, ObjectInput.EVICT): (H, [DropInstance()], []),
    (A, ObjectInput.RESET): (
        H,
        [DropInstance(), CloseSockets(1011, "Durable Object reset"), DropEvents(("queued",))],
        [],
    ),
    # A cluster member losing the slot while a constructor's block_concurrency_while() runs.
    (W, ObjectInput.RESET): (
        H,
        [DropInstance(), CloseSockets(1011, "Durable Object reset"), DropEvents(("queued",))],
        [],
    ),
}


def test_the_table_has_exactly_the_expected_rows():
    assert set(OBJECT_TRANSITIONS) == set(EXPECTED)


@pytest.mark.parametrize(("state", "what"), sorted(EXPECTED, key=str))
def test_legal_object_row(state, what):
    lc = prepared(state, what)
    effects = fire(lc, what)
    next_state, expected_effects, queue = EXPECTED[(state, what)]
    assert lc.state is next_state
    assert effects == expected_effects
    assert list(lc.queue) == queue


ILLEGAL = [(s, i) for s, i in itertools.product(ObjectState, ObjectInput) if (s, i) not in EXPECTED]


@pytest.mark.parametrize(("state", "what"), ILLEGAL, ids=str)
def test_illegal_object_pair_raises_and_changes_nothing(state, what):
    lc = prepared(state, what)
    before = (lc.state, list(lc.queue), lc.current, dict(lc.pins), lc.idle_since)
    with pytest.raises(NoTransitionError) as info:
        fire(lc, what)
    assert info.value.state is state
    assert info.value.event is what
    assert isinstance(info.value, RuntimeError)
    assert (lc.state, list(lc.queue), lc.current, dict(lc.pins), lc.idle_since) == before


def test_a_new_object_wakes_on_its_first_event_and_idles_after_it():
    lc = ObjectLifecycle()
    assert lc.state is H
    assert lc.event_arrived("e1", 1.0) == [RunConstructor()]
    assert lc.event_arrived("e2", 1.5) == []
    assert lc.constructed(2.0) == [Deliver("e1")]
    assert lc.turn_ended(3.0) == [Deliver("e2")]
    assert lc.turn_ended(4.0) == [BecameIdle(4.0)]
    assert lc.idle_since == 4.0
    assert lc.hibernation_blocker() is None


def test_events_are_delivered_one_at_a_time_in_arrival_order():
    lc = ObjectLifecycle(state=A)
    assert lc.event_arrived("a", 1) == [Deliver("a")]
    assert lc.event_arrived("b", 1) == []
    assert lc.event_arrived("c", 1) == []
    assert lc.current == "a"
    assert lc.turn_ended(2) == [Deliver("b")]
    assert lc.turn_ended(2) == [Deliver("c")]
    assert lc.turn_ended(2) == [BecameIdle(2)]


def test_evict_refuses_while_something_pins_the_object():
    lc = ObjectLifecycle(state=A)
    lc.event_arrived("a", 1)
    with pytest.raises(InvalidStateError, match="an event is being handled"):
        lc.evict(2)
    assert lc.state is A
    lc.turn_ended(3)
    lc.pin("wait_until work is pending")
    assert lc.hibernation_blocker() == "wait_until work is pending"
    with pytest.raises(InvalidStateError, match="wait_until"):
        lc.evict(4)
    assert lc.unpin("wait_until work is pending", 5) == [BecameIdle(5)]
    assert lc.evict(6) == [DropInstance()]
    assert lc.state is H


def test_blocker_names_queued_events_and_states():
    assert ObjectLifecycle(state=H).hibernation_blocker() == "it is hibernating"
    lc = ObjectLifecycle(state=W)
    assert lc.hibernation_blocker() == "it is waking"
    lc = ObjectLifecycle(state=A)
    lc.queue.extend(["x", "y"])
    assert lc.hibernation_blocker() == "2 events are queued"
    lc.queue.pop()
    assert lc.hibernation_blocker() == "1 event is queued"


def test_turn_ended_without_a_turn_raises():
    lc = ObjectLifecycle(state=A)
    with pytest.raises(InvalidStateError, match="no event being handled"):
        lc.turn_ended(1)


def test_unpin_without_pin_raises():
    with pytest.raises(InvalidStateError, match="without a matching pin"):
        ObjectLifecycle(state=A).unpin("x", 1)


def test_pins_count():
    lc = ObjectLifecycle(state=A)
    lc.pin("p")
    lc.pin("p")
    assert lc.unpin("p", 1) == []
    assert lc.hibernation_blocker() == "p"
    assert lc.unpin("p", 2) == [BecameIdle(2)]


# -- sockets ------------------------------------------------------------------------

C, OP, CR, CS, X, L = (
    SocketState.CONNECTING,
    SocketState.OPEN,
    SocketState.CLOSE_RECEIVED,
    SocketState.CLOSE_SENT,
    SocketState.CLOSED,
    SocketState.LOST,
)
SI = SocketInput

SOCKET_EXPECTED = {
    (C, SI.HANDSHAKE_DONE): (OP, Final.NONE),
    (C, SI.HANDSHAKE_FAILED): (L, Final.NONE),
    (C, SI.APP_CLOSE): (CS, Final.NONE),
    (CS, SI.HANDSHAKE_DONE): (CS, Final.NONE),
    (CS, SI.HANDSHAKE_FAILED): (X, Final.NONE),
    (OP, SI.PEER_CLOSE): (CR, Final.CLOSE),
    (OP, SI.APP_CLOSE): (CS, Final.NONE),
    (OP, SI.TRANSPORT_LOST): (L, Final.CLOSE),
    (OP, SI.FAIL): (X, Final.ERROR),
    (CR, SI.APP_CLOSE): (X, Final.NONE),
    (CR, SI.TRANSPORT_LOST): (L, Final.NONE),
    (CS, SI.PEER_CLOSE): (X, Final.CLOSE),
    (CS, SI.APP_CLOSE): (CS, Final.NONE),
    (CS, SI.TRANSPORT_LOST): (X, Final.CLOSE),
    (CS, SI.FAIL): (X, Final.ERROR),
    (X, SI.APP_CLOSE): (X, Final.NONE),
    (X, SI.TRANSPORT_LOST): (X, Final.NONE),
    (L, SI.APP_CLOSE): (X, Final.NONE),
    (L, SI.TRANSPORT_LOST): (L, Final.NONE),
}


def test_socket_table_has_exactly_the_expected_rows():
    assert SOCKET_TRANSITIONS == SOCKET_EXPECTED


@pytest.mark.parametrize(("state", "what"), sorted(SOCKET_EXPECTED, key=str), ids=str)
def test_legal_socket_row(state, what):
    assert socket_transition(state, what) == SOCKET_EXPECTED[(state, what)]


@pytest.mark.parametrize(
    ("state", "what"),
    [(s, i) for s, i in itertools.product(SocketState, SocketInput) if (s, i) not in SOCKET_EXPECTED],
    ids=str,
)
def test_illegal_socket_pair_raises(state, what):
    with pytest.raises(NoTransitionError):
        socket_transition(state, what)


def test_every_path_queues_at_most_one_final_event():
    # Walk every sequence of up to 5 inputs from CONNECTING: a socket never
    # produces two final events (SPEC §5: exactly one per socket).
    def walk(state, finals, depth):
        assert finals <= 1, "two final events on one path"
        if depth == 0:
            return
        for what in SocketInput:
            row = SOCKET_TRANSITIONS.get((state, what))
            if row is not None:
                walk(row[0], finals + (row[1] is not Final.NONE), depth - 1)

    walk(C, 0, 6)


def snapshot(lc):
    return (lc.state, list(lc.queue), lc.current, dict(lc.pins), lc.idle_since)


@pytest.mark.parametrize("queued", [0, 1, 3])
@pytest.mark.parametrize("busy", [False, True])
def test_the_fast_paths_do_what_the_table_says(queued, busy):
    # event_arrived() and turn_ended() skip the table for the two moves every message makes;
    # they must leave the same state and return the same effects as the table's rows.
    def make():
        lc = ObjectLifecycle(state=ObjectState.ACTIVE)
        if busy:
            lc.try_start("current")
            for i in range(queued):
                lc.event_arrived(f"q{i}", 0.5)
        return lc

    fast, slow = make(), make()
    assert fast.event_arrived("e", 1.0) == slow._fire(ObjectInput.EVENT_ARRIVED, 1.0, "e")
    assert snapshot(fast) == snapshot(slow)
    if busy:
        assert fast.turn_ended(2.0) == slow._fire(ObjectInput.TURN_ENDED, 2.0)
        assert snapshot(fast) == snapshot(slow)
    if busy:
        # and a turn that ends with nothing behind it: the table's row says "idle since now" too
        fast, slow = make(), make()
        assert fast.turn_ended(2.0) == slow._fire(ObjectInput.TURN_ENDED, 2.0)
        assert snapshot(fast) == snapshot(slow)


def test_try_start_starts_a_turn_only_for_an_awake_object_with_nothing_to_do():
    # The runtime delivers at once when try_start() says True, and asks the table otherwise.
    lc = ObjectLifecycle(state=A, idle_since=1.0)
    assert lc.try_start("e")
    assert (lc.current, lc.idle_since) == ("e", None)
    for lc in (
        ObjectLifecycle(state=A, current="running"),
        ObjectLifecycle(state=A, queue=deque(["queued"])),
        ObjectLifecycle(state=W),
        ObjectLifecycle(state=H),
    ):
        before = snapshot(lc)
        assert not lc.try_start("e")
        assert snapshot(lc) == before


def test_try_end_ends_a_turn_only_when_nothing_is_queued_or_pinned():
    lc = ObjectLifecycle(state=A, current="e")
    assert lc.try_end(3.0)
    assert (lc.current, lc.idle_since) == (None, 3.0)
    for lc in (
        ObjectLifecycle(state=A),
        ObjectLifecycle(state=A, current="e", queue=deque(["queued"])),
        ObjectLifecycle(state=A, current="e", pins={"wait_until": 1}),
        ObjectLifecycle(state=W, current="e"),
    ):
        before = snapshot(lc)
        assert not lc.try_end(3.0)
        assert snapshot(lc) == before


def test_busy_means_an_event_handled_or_queued_or_a_wake_under_way():
    assert ObjectLifecycle(state=A, current="e").busy()
    assert ObjectLifecycle(state=A, queue=deque(["e"])).busy()
    assert ObjectLifecycle(state=W).busy()
    # idle, hibernated or only pinned (wait_until work) is not busy: the runtime's barrier
    # and wsecho.testing wait for busy objects only
    assert not ObjectLifecycle(state=A).busy()
    assert not ObjectLifecycle(state=H).busy()
    assert not ObjectLifecycle(state=A, pins={"wait_until": 1}).busy()


def test_an_object_reset_during_a_turn_wakes_again_and_gets_its_next_event():
    lc = ObjectLifecycle(state=A)
    lc.event_arrived("running", 1.0)
    lc.event_arrived("queued", 1.0)
    assert lc.reset(2.0) == [DropInstance(), CloseSockets(1011, "Durable Object reset"), DropEvents(("queued",))]
    assert not lc.busy()
    assert lc.event_arrived("next", 3.0) == [RunConstructor()]
    assert lc.constructed(3.0) == [Deliver("next")]


def test_a_hibernated_object_is_no_longer_idle_since_anything():
    # idle_since is what the admin listing shows as idle_seconds; a hibernated object has none.
    lc = ObjectLifecycle(state=A)
    lc.event_arrived("e", 1.0)
    lc.turn_ended(2.0)
    assert lc.idle_since == 2.0
    lc.evict(12.0)
    assert lc.idle_since is None


def test_every_wire_state_and_input_has_a_row_or_is_refused():
    from wsecho.core.lifecycle import WIRE_TRANSITIONS, WireEffect, WireInput, WireState, wire_transition

    for state in WireState:
        for what in WireInput:
            if (state, what) in WIRE_TRANSITIONS:
                assert wire_transition(state, what) == WIRE_TRANSITIONS[(state, what)]
            else:
                with pytest.raises(NoTransitionError):
                    wire_transition(state, what)
    # a failed connection never writes or reads another frame
    assert {effect for (state, _), (_, effect) in WIRE_TRANSITIONS.items() if state is WireState.FAILED} <= {
        WireEffect.NOTHING,
        WireEffect.ABORT,
    }
