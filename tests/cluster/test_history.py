"""The fault tests' checker finds what it must (so a green fault test means something)."""

import asyncio

import pytest

from tests.apps.workers_app import Turn
from tests.cluster.history import acks, activations, lost_writes, overlaps, recovery


def test_an_instance_running_after_another_was_built_is_an_overlap():
    probe = [
        "ctor r 10 1.0 aaaa",
        "turn r 10 1.1 1.2 aaaa 1.1",
        "ctor r 20 2.0 bbbb",
        "turn r 20 2.1 2.2 bbbb 2.1",
        "turn r 10 2.5 2.6 aaaa 2.5",  # the old instance woke up and acted
    ]
    problems = overlaps(activations(probe))
    assert problems == [
        "r: instance aaaa (pid 10) acted at 2.500 (a turn from 2.500 to 2.600), after instance bbbb (pid 20) "
        "was built at 2.000"
    ]


def test_a_turn_that_went_on_after_an_await_once_another_was_built_is_an_overlap():
    probe = ["ctor r 10 1.0 a", "turn r 10 1.9 2.6 a 2.4", "ctor r 20 2.0 b"]
    assert len(overlaps(activations(probe))) == 1


def test_handing_over_after_the_last_turn_is_fine():
    probe = [
        "ctor r 10 1.0 a",
        "turn r 10 1.1 1.9 a 1.5",
        "ctor r 20 2.0 b",
        "turn r 20 2.1 2.2 b 2.1",
        "ctor s 10 1 c",
    ]
    assert overlaps(activations(probe)) == []


def test_the_rest_of_a_turn_that_last_acted_before_the_other_was_built_is_not_an_overlap():
    # Paused in its synchronous code (or unwound at its await) until after the other was built.
    probe = ["ctor r 10 1.0 a", "turn r 10 1.9 5.6 a 1.95", "ctor r 20 2.0 b"]
    assert overlaps(activations(probe)) == []


def test_a_count_that_goes_back_is_a_lost_write():
    history = ["ack r 1 1.0", "ack r 2 1.1", "closed r 1006 1.2", "ack r 2 2.0", "ack q 1 1.0"]
    assert lost_writes(acks(history)) == ["r: acknowledged 2 at 2.000 after 2 was acknowledged"]
    assert lost_writes(acks(["ack r 1 1.0", "ack r 3 2.0"])) == []  # unacknowledged writes may land


def test_recovery_is_the_time_to_the_first_ack_after_the_fault():
    by_room = acks(["ack r 1 1.0", "ack r 2 5.5", "ack q 1 1.0"])
    assert recovery(by_room, 2.0, ["r", "q"]) == {"r": 3.5, "q": float("inf")}


def test_the_probe_counts_a_turn_as_acting_again_only_when_an_await_suspended_it():
    async def cached():
        return 1

    async def suspends():
        await asyncio.sleep(0)
        return 2

    async def unwound():
        await asyncio.sleep(0)
        raise LookupError

    async def main():
        turn = Turn()
        start = turn.acted
        assert await turn.wait(cached()) == 1
        assert turn.acted == start  # no suspension: the turn's own synchronous code went on
        with pytest.raises(LookupError):
            await turn.wait(unwound())
        assert turn.acted == start  # an exception at the await: the turn only unwinds
        assert await turn.wait(suspends()) == 2
        assert turn.acted > start  # resumed by the event loop: the turn acted again

    asyncio.run(main())
