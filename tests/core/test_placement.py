"""Which worker owns an object: the slot of an id, and a worker's place among N."""

import pytest

from wsecho.core.placement import SLOTS, Placement, slot_of


def test_an_objects_slot_is_the_first_32_bits_of_its_id_modulo_4096():
    # Documented (docs/scaling-out.md), and shared: the cluster's lease rows in PostgreSQL are
    # one per slot, so every member, of every version, must compute the same slot of an id.
    assert SLOTS == 4096
    assert slot_of("12345678" + "9" * 56) == 0x678
    assert slot_of("00000fff" + "f" * 56) == SLOTS - 1
    assert slot_of("00001000" + "f" * 56) == 0


@pytest.mark.parametrize(("index", "count"), [(0, 0), (-1, 2), (2, 2)])
def test_a_worker_index_outside_its_count_is_refused(index, count):
    with pytest.raises(ValueError, match=f"worker index {index} is not one of {count} workers"):
        Placement(index, count)


def test_one_worker_owns_every_object_and_two_share_them():
    ids = [f"{i:08x}" + "0" * 56 for i in range(8)]
    assert all(Placement(0, 1).is_local(hex_id) for hex_id in ids)
    assert [Placement(1, 2).owner(hex_id) for hex_id in ids] == [0, 1] * 4
    assert [Placement(1, 2).is_local(hex_id) for hex_id in ids] == [False, True] * 4
