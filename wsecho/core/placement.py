"""Which worker owns an object: the object's slot, and the slot's worker.

An object's slot is the first 32 bits of its id modulo :data:`SLOTS`; with ``--workers N``
slot ``s`` belongs to worker ``s mod N``. The map is fixed for the life of the supervisor: a
worker that dies is restarted under the same index and takes its slots back, so an object
never has two owners and never moves (docs/decisions/0005).
"""

from __future__ import annotations

import attrs

#: How many slots the id space is cut into.
SLOTS = 4096


def slot_of(hex_id: str) -> int:
    """The slot of the object whose id is ``hex_id`` (64 lowercase hex digits)."""
    return int(hex_id[:8], 16) % SLOTS


@attrs.frozen
class Placement:
    """Worker ``index`` of ``count``: who owns which object."""

    index: int
    count: int = attrs.field()

    @count.validator
    def _check(self, _: object, count: int) -> None:
        if count < 1 or not 0 <= self.index < count:
            msg = f"worker index {self.index} is not one of {count} workers"
            raise ValueError(msg)

    def owner(self, hex_id: str) -> int:
        """The index of the worker that owns the object ``hex_id``."""
        return slot_of(hex_id) % self.count

    def is_local(self, hex_id: str) -> bool:
        return slot_of(hex_id) % self.count == self.index
