"""Slot leases across machines, the pure part (docs/decisions/0007): which member should own
each slot, and whether this member can still prove the leases it holds.

Time here is whatever monotonic clock the caller passes in; nothing reads a clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable

import attrs

from wsecho.core.placement import SLOTS

#: The share of a lease's ttl kept as a safety margin against clocks that run at different
#: rates on different machines (real drift is parts per million; this is 5%).
DRIFT_MARGIN = 0.05


def _score(slot: int, member: str) -> int:
    digest = hashlib.blake2b(f"{slot}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(slot: int, members: Iterable[str]) -> str | None:
    """The member that should own ``slot``: the highest rendezvous hash of (slot, member).

    Every member computes the same answer from the same list, and adding or removing one
    member moves only the slots that member gains or loses.
    """
    best: str | None = None
    best_score = -1
    for member in members:
        score = _score(slot, member)
        if score > best_score or (score == best_score and best is not None and member < best):
            best, best_score = member, score
    return best


def desired_slots(me: str, members: Collection[str], slots: int = SLOTS) -> frozenset[int]:
    """The slots ``me`` should own among ``members`` (``me`` counts as a member)."""
    everyone = set(members) | {me}
    return frozenset(s for s in range(slots) if rendezvous_owner(s, everyone) == me)


@attrs.frozen
class Lease:
    """A slot this member holds: the epoch it acts under, and until when it can prove it
    (on the caller's monotonic clock)."""

    slot: int
    epoch: int
    deadline: float


@attrs.define
class LeaseTable:
    """The leases this member holds and how long each is provable.

    A renewal that the database confirmed proves the lease until the local time at which the
    renewal was *sent* plus the ttl, minus :data:`DRIFT_MARGIN` of it: the database set the
    expiry from its own clock after it received the request, so no other member can take the
    slot before then.
    """

    ttl: float
    held: dict[int, Lease] = attrs.Factory(dict)

    def confirm(self, epochs: dict[int, int], sent_at: float) -> None:
        """The database confirmed ``epochs`` (slot -> epoch) for a request sent at ``sent_at``."""
        deadline = sent_at + self.ttl * (1 - DRIFT_MARGIN)
        for slot, epoch in epochs.items():
            self.held[slot] = Lease(slot, epoch, deadline)

    def provable(self, slot: int, now: float) -> bool:
        lease = self.held.get(slot)
        return lease is not None and now < lease.deadline

    def epoch(self, slot: int) -> int | None:
        lease = self.held.get(slot)
        return None if lease is None else lease.epoch

    def expired(self, now: float) -> list[int]:
        """The held slots that can no longer be proven (the caller stops serving them)."""
        return sorted(s for s, lease in self.held.items() if now >= lease.deadline)

    def drop(self, slots: Iterable[int]) -> None:
        for slot in slots:
            self.held.pop(slot, None)

    def slots(self) -> frozenset[int]:
        return frozenset(self.held)
