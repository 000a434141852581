"""A cluster member's leases (docs/decisions/0007): keep the slots it should own, prove them
before acting, stop serving the moment it cannot.

Every ``ttl / 3`` the member heartbeats, computes the slots it should own from the live
members (rendezvous hashing: wsecho.core.leases), releases the ones it should no longer
own (after closing their sockets with 1012), and takes or renews the rest in one statement.
A timer checks the local proof every ``ttl / 20``: a slot whose proof ran out is dropped
(sockets closed with 1012, instances dropped) even when the database cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from wsecho.core.leases import LeaseTable, desired_slots, rendezvous_owner
from wsecho.core.placement import slot_of
from wsecho.core.wording import counted

if TYPE_CHECKING:
    from wsecho.backends.leases import SlotOwner

log = logging.getLogger("wsecho.cluster")


def machine_of(name: str) -> str:
    """``MACHINE#INDEX`` (a worker of ``--workers N``) -> ``MACHINE``; any other name stays."""
    machine, _, index = name.rpartition("#")
    return machine if machine and index.isdigit() else name


class LeaseStore(Protocol):
    """The statements a member needs (wsecho.backends.leases.PostgresLeases)."""

    member: str
    name: str
    #: ``host:port`` of this member's peer channel, written with its heartbeat (None: none).
    address: str | None
    #: The longest one statement may take.
    statement_timeout: float

    async def create_schema(self) -> None: ...

    async def heartbeat(self, ttl: float, draining: bool) -> list[str]: ...

    async def acquire(self, slots: Sequence[int], ttl: float) -> dict[int, int]: ...

    async def release(self, slots: Sequence[int]) -> None: ...

    async def leave(self) -> None: ...

    async def locate(self, slot: int) -> SlotOwner | None:
        """Who holds ``slot``'s live lease, and its peer channel's address."""
        ...

    async def close(self) -> None: ...

    def forget_connection(self) -> None: ...


class ClusterMember:
    """One serving process's membership and leases; the runtime's :class:`Ownership`."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        ttl: float,
        clock: Callable[[], float],
        on_lost: Callable[[Collection[int], str], object],
        on_gained: Callable[[Collection[int]], object] | None = None,
        probed_at: Callable[[], float] | None = None,
        probe_timeout: float = 0.0,
    ) -> None:
        """``probed_at`` (the clock's time of the last health check from a load balancer) and
        ``probe_timeout``: a member no load balancer has checked for that long cannot be
        reached by clients, so it gives its slots up (as if draining) until checks return."""
        self.store = store
        store.statement_timeout = min(store.statement_timeout, ttl / 4)
        self.ttl = ttl
        self.clock = clock
        self.table = LeaseTable(ttl)
        self._on_lost = on_lost
        self._on_gained = on_gained
        self.members: frozenset[str] = frozenset()
        self.desired: frozenset[int] = frozenset()
        self.draining = False
        self.stopping = False
        #: Held every slot it should own at least once since it started.
        self.settled = False
        self._settled = asyncio.Event()
        self._probed_at = probed_at
        self.probe_timeout = probe_timeout
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()

    # -- Ownership (the runtime asks before acting) ------------------------------------------

    def is_local(self, hex_id: str) -> bool:
        return self.table.provable(slot_of(hex_id), self.clock())

    def owner(self, hex_id: str) -> int | str | None:
        """Who should serve ``hex_id``: the index of a worker of this machine (members named
        ``MACHINE#INDEX`` are the workers of ``--workers N``), else the name of the member of
        another machine (reached through the peer channel); None when it is this member's."""
        name = self.expected_owner(hex_id)
        if name is None or name == self.store.name:
            return None
        machine, _, index = name.rpartition("#")
        if machine and index.isdigit() and machine == self.machine:
            return int(index)
        return name

    @property
    def machine(self) -> str:
        """This member's machine: its name without a worker's ``#INDEX``."""
        return machine_of(self.store.name)

    def expected_owner(self, hex_id: str) -> str | None:
        """The name of the member that should serve ``hex_id`` (with a stable membership, the one that does)."""
        return rendezvous_owner(slot_of(hex_id), self.members | {self.store.name})

    def epochs(self, slots: Collection[int]) -> dict[int, int]:
        """The epoch of each of ``slots`` this member acts under (for the fencing check)."""
        out = {}
        for slot in slots:
            epoch = self.table.epoch(slot)
            if epoch is not None:
                out[slot] = epoch
        return out

    def ready(self) -> bool:
        """Whether a load balancer should send it clients: once it has held every slot it should
        own (at start), for as long as it reaches the lease table and is not draining. A few
        slots it waits for later (another member's commit still holds them) do not make the
        whole member unready: requests for those get 503 on their own."""
        return self.settled and self.last_error is None and not self.draining

    def status(self) -> str:
        if self.last_error is not None:
            return f"cannot reach the lease table: {self.last_error}"
        held = len(self.table.held)
        return (
            f"holds {held} of the {len(self.desired)} slots it should own among {counted(len(self.members), 'member')}"
        )

    # -- the loop ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.create_schema()
        await self.round()
        self._task = asyncio.ensure_future(self._loop())
        self._arm_watch()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.ttl / 3)
            self._wake.clear()
            try:
                # Bounded: a database that stopped answering must not hold the loop past the proof.
                async with asyncio.timeout(self.ttl / 3):
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a database outage must not end the loop
                if isinstance(exc, TimeoutError):
                    self.store.forget_connection()
                    exc = TimeoutError(f"no answer within {self.ttl / 3:g}s")
                if self.last_error is None:
                    log.error("cannot renew the slot leases: %s; slots are dropped as their proof runs out", exc)
                self.last_error = str(exc) or type(exc).__name__

    def _unreachable(self, now: float) -> bool:
        if self._probed_at is None or self.probe_timeout <= 0:
            return False
        return now - self._probed_at() > self.probe_timeout

    async def round(self) -> None:
        """One heartbeat, rebalance and renewal."""
        sent = self.clock()
        unreachable = self._unreachable(sent)
        draining = self.stopping or unreachable
        if draining != self.draining:
            self.draining = draining
            self.members = frozenset()  # recompute what it should own
            if unreachable:
                log.warning(
                    "no load balancer has checked this process for %gs: giving its slots to the others",
                    self.probe_timeout,
                )
            elif not self.stopping:
                log.info("a load balancer checks this process again: taking a share of the slots")
        members = frozenset(await self.store.heartbeat(self.ttl, self.draining))
        if members != self.members:
            log.info("members: %s (%s)", ", ".join(sorted(members)) or "none", counted(len(members), "serving member"))
            self.members = members
            self.desired = frozenset() if self.draining else desired_slots(self.store.name, members)
        held = self.table.slots()
        surplus = sorted(held - self.desired)
        if surplus:
            # Someone else should own these now: stop, then let them go at once.
            self._drop(surplus, "the slots moved to another member")
            await self.store.release(surplus)
        epochs = await self.store.acquire(sorted(self.desired), self.ttl)
        before = self.table.slots()
        self.table.confirm(epochs, sent)
        lost = sorted(before - set(epochs))
        if lost:
            self._drop(lost, "another member holds their leases")
        if not self.settled and self.desired <= set(epochs):
            self.settled = True
            self._settled.set()
        gained = sorted(set(epochs) - before)
        if gained:
            log.info("took the leases of %s", counted(len(gained), "slot"))
            if self._on_gained is not None:
                self._on_gained(gained)
        if self.last_error is not None:
            log.info("the lease table answers again")
            self.last_error = None

    def _drop(self, slots: Collection[int], why: str) -> None:
        self.table.drop(slots)
        self._on_lost(slots, why)

    def _arm_watch(self) -> None:
        self._watch = asyncio.get_running_loop().call_later(self.ttl / 20, self._check_proof)

    def _check_proof(self) -> None:
        try:
            expired = self.table.expired(self.clock())
            if expired:
                self._drop(expired, "their lease could not be renewed in time")
        finally:
            self._arm_watch()  # whatever dropping raised, the proof is checked again

    async def wait_settled(self, timeout: float) -> bool:
        """Wait (bounded) until it has held every slot it should own: a member that restarts
        after a crash waits for its predecessor's leases to expire; one that joins waits for the
        others to hand its share over on their next round."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def nudge(self) -> None:
        """Run a round now (a member joined or left)."""
        self._wake.set()

    async def drain(self) -> None:
        """Give every slot up (a clean stop): the others take them at once."""
        self.stopping = self.draining = True
        held = sorted(self.table.slots())
        self._drop(held, "this process is stopping")
        with contextlib.suppress(Exception):
            await self.store.leave()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.store.close()
