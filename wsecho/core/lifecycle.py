"""The sans-IO core: the lifecycle of an object and of each of its sockets.

Nothing here imports Tornado, sqlite3 or a clock. Callers pass ``now`` (seconds
on any monotonic scale) and get back the effects they must carry out. Both
machines are driven by data: :data:`OBJECT_TRANSITIONS` for objects and
:data:`SOCKET_TRANSITIONS` for sockets. A move that is not in a table raises
:class:`~wsecho.core.errors.NoTransitionError` and changes nothing.

Object states (SPEC §3):

- ``ACTIVE``: the instance is in memory; events are delivered one at a time.
- ``HIBERNATING``: the instance is dropped; the sockets stay open.
- ``WAKING``: an event arrived while hibernating; the constructor is running
  and every event that arrives meanwhile is queued in arrival order.

A brand-new object starts in ``HIBERNATING``: it has no instance yet, and its
first event wakes it exactly like a hibernated one.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Generic, TypeVar

import attrs

from wsecho.core.errors import InvalidStateError, NoTransitionError
from wsecho.core.wording import counted

E = TypeVar("E")


class ObjectState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code

    ACTIVE = "active"
    HIBERNATING = "hibernating"
    WAKING = "waking"


class ObjectInput(enum.Enum):
    """What can happen to an object."""

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code

    EVENT_ARRIVED = "event arrived"
    CONSTRUCTOR_RETURNED = "constructor returned"
    CONSTRUCTOR_RAISED = "constructor raised"
    TURN_ENDED = "turn ended"
    EVICT = "evict"
    RESET = "reset"


class Action(enum.Enum):
    """The fixed part of a row's effects; :class:`ObjectLifecycle` adds the data."""

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code

    ENQUEUE = "enqueue the event"
    RUN_CONSTRUCTOR = "run the constructor"
    NEXT_TURN = "deliver the next queued event if no turn is running"
    DROP_INSTANCE = "drop the instance"
    CLOSE_SOCKETS = "close every socket with 1011"
    DROP_QUEUE = "drop and report the queued events"


S = ObjectState
I = ObjectInput  # noqa: E741 - a short alias keeps the table readable
A = Action

#: ``(state, input) -> (next state, actions)``; the only place object states change.
OBJECT_TRANSITIONS: dict[tuple[ObjectState, ObjectInput], tuple[ObjectState, tuple[Action, ...]]] = {
    (S.HIBERNATING, I.EVENT_ARRIVED): (S.WAKING, (A.ENQUEUE, A.RUN_CONSTRUCTOR)),
    (S.WAKING, I.EVENT_ARRIVED): (S.WAKING, (A.ENQUEUE,)),
    (S.ACTIVE, I.EVENT_ARRIVED): (S.ACTIVE, (A.ENQUEUE, A.NEXT_TURN)),
    (S.WAKING, I.CONSTRUCTOR_RETURNED): (S.ACTIVE, (A.NEXT_TURN,)),
    # SPEC §3: a constructor that raises closes every socket with 1011 and the
    # object returns to hibernating; queued events are dropped and reported.
    (S.WAKING, I.CONSTRUCTOR_RAISED): (S.HIBERNATING, (A.CLOSE_SOCKETS, A.DROP_QUEUE)),
    (S.ACTIVE, I.TURN_ENDED): (S.ACTIVE, (A.NEXT_TURN,)),
    (S.ACTIVE, I.EVICT): (S.HIBERNATING, (A.DROP_INSTANCE,)),
    # abort() and an event over its timeout reset the object (SPEC §3).
    (S.ACTIVE, I.RESET): (S.HIBERNATING, (A.DROP_INSTANCE, A.CLOSE_SOCKETS, A.DROP_QUEUE)),
    # A cluster member that loses the object's slot while its constructor's
    # block_concurrency_while() runs: the wake goes, as an instance would.
    (S.WAKING, I.RESET): (S.HIBERNATING, (A.DROP_INSTANCE, A.CLOSE_SOCKETS, A.DROP_QUEUE)),
}

del S, I, A


@attrs.frozen
class RunConstructor:
    """Create the instance; report back with ``constructed`` or ``construct_failed``."""


@attrs.frozen
class Deliver(Generic[E]):
    """Run this event's handler; report back with ``turn_ended`` when it is done."""

    event: E


@attrs.frozen
class DropInstance:
    """Forget the instance and everything reachable only from it."""


@attrs.frozen
class CloseSockets:
    """Close every socket of the object with this code and reason."""

    code: int
    reason: str


@attrs.frozen
class DropEvents(Generic[E]):
    """These queued events will never be delivered; report each of them."""

    events: tuple[E, ...]


@attrs.frozen
class BecameIdle:
    """The object has nothing to do since ``since``; it may hibernate after its timeout."""

    since: float


Effect = RunConstructor | Deliver[E] | DropInstance | CloseSockets | DropEvents[E] | BecameIdle


@attrs.define(eq=False)
class ObjectLifecycle(Generic[E]):
    """One object's lifecycle: its state, its event queue, and what pins it in memory.

    Events are opaque to the core. Delivery is turn-based: at most one event is
    being handled (``current``) and the rest wait in ``queue`` in arrival order.
    """

    state: ObjectState = ObjectState.HIBERNATING
    queue: deque[E] = attrs.field(factory=deque)
    current: E | None = None
    #: Reasons other than a running turn that keep the instance in memory
    #: (``wait_until`` work, a non-hibernatable socket, ...), with a count each.
    pins: dict[str, int] = attrs.field(factory=dict)
    idle_since: float | None = None

    # -- inputs ---------------------------------------------------------------

    def event_arrived(self, event: E, now: float) -> list[Effect[E]]:
        if self.try_start(event):
            return [Deliver(event)]
        return self._fire(ObjectInput.EVENT_ARRIVED, now, event)

    def try_start(self, event: E) -> bool:
        """The hottest row, (active, event arrived) with nothing queued: start ``event``'s turn
        and return True (its one effect is ``Deliver(event)``); otherwise change nothing.

        What ``_fire`` would do for that row; checked against the table at import.
        """
        if self.state is _ACTIVE and self.current is None and not self.queue:
            self.current = event
            self.idle_since = None
            return True
        return False

    def try_end(self, now: float) -> bool:
        """The other hot row, (active, turn ended) with nothing queued or pinned: end the turn
        and return True (its one effect is ``BecameIdle(now)``); otherwise change nothing."""
        if self.state is _ACTIVE and self.current is not None and not self.queue and not self.pins:
            self.current = None
            self.idle_since = now
            return True
        return False

    def constructed(self, now: float) -> list[Effect[E]]:
        return self._fire(ObjectInput.CONSTRUCTOR_RETURNED, now)

    def construct_failed(self, now: float) -> list[Effect[E]]:
        return self._fire(ObjectInput.CONSTRUCTOR_RAISED, now)

    def turn_ended(self, now: float) -> list[Effect[E]]:
        if self.current is None:
            msg = f"turn_ended() with no event being handled (state {self.state.value})"
            raise InvalidStateError(msg)
        if self.try_end(now):
            return [BecameIdle(now)]
        return self._fire(ObjectInput.TURN_ENDED, now)

    def evict(self, now: float) -> list[Effect[E]]:
        """Hibernate now; raises if anything pins the object (see ``hibernation_blocker``)."""
        if self.state is ObjectState.ACTIVE:
            reason = self.hibernation_blocker()
            if reason is not None:
                msg = f"cannot hibernate: {reason}"
                raise InvalidStateError(msg)
        return self._fire(ObjectInput.EVICT, now)

    def reset(self, now: float) -> list[Effect[E]]:
        return self._fire(ObjectInput.RESET, now)

    def pin(self, reason: str) -> None:
        self.pins[reason] = self.pins.get(reason, 0) + 1
        self.idle_since = None

    def unpin(self, reason: str, now: float) -> list[Effect[E]]:
        count = self.pins.get(reason, 0)
        if count <= 0:
            msg = f"unpin({reason!r}) without a matching pin()"
            raise InvalidStateError(msg)
        if count == 1:
            del self.pins[reason]
        else:
            self.pins[reason] = count - 1
        return self._idle_effects(now)

    # -- queries --------------------------------------------------------------

    def busy(self) -> bool:
        """Whether events are in the object's hands: one handled, some queued, or a wake under way.

        The one definition of "busy" (the runtime's barrier and wsecho.testing use it)."""
        return self.current is not None or bool(self.queue) or self.state is ObjectState.WAKING

    def hibernation_blocker(self) -> str | None:
        """Why the object cannot hibernate now, or None if it can."""
        if self.state is not ObjectState.ACTIVE:
            return f"it is {self.state.value}"
        if self.current is not None:
            return "an event is being handled"
        if self.queue:
            return f"{counted(len(self.queue), 'event is', 'events are')} queued"
        for reason in self.pins:
            return reason
        return None

    # -- the machine ------------------------------------------------------------

    def _fire(self, what: ObjectInput, now: float, event: E | None = None) -> list[Effect[E]]:
        row = OBJECT_TRANSITIONS.get((self.state, what))
        if row is None:
            raise NoTransitionError(self.state, what)
        self.state, actions = row
        effects: list[Effect[E]] = []
        if what is ObjectInput.TURN_ENDED:
            self.current = None
        for action in actions:
            if action is Action.ENQUEUE:
                # (idle_since is None already: an event waits only behind a turn or a wake,
                # and an idle object's event starts its turn through try_start)
                self.queue.append(event)  # type: ignore[arg-type]
            elif action is Action.RUN_CONSTRUCTOR:
                effects.append(RunConstructor())
            elif action is Action.NEXT_TURN:
                if self.current is None and self.queue:
                    self.current = self.queue.popleft()
                    effects.append(Deliver(self.current))
            elif action is Action.DROP_INSTANCE:
                self.current = None
                self.idle_since = None
                effects.append(DropInstance())
            elif action is Action.CLOSE_SOCKETS:
                effects.append(CloseSockets(1011, "Durable Object reset"))
            elif action is Action.DROP_QUEUE:
                dropped = tuple(self.queue)
                self.queue.clear()
                if dropped:
                    effects.append(DropEvents(dropped))
        effects.extend(self._idle_effects(now))
        return effects

    def _idle_effects(self, now: float) -> list[Effect[E]]:
        if self.idle_since is None and self.hibernation_blocker() is None:
            self.idle_since = now
            return [BecameIdle(now)]
        return []


_ACTIVE = ObjectState.ACTIVE


# -- sockets ------------------------------------------------------------------------


class SocketState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code

    CONNECTING = "connecting"  # accepted by an object, handshake not finished
    OPEN = "open"
    CLOSE_RECEIVED = "close received"  # the peer sent Close; we have not answered
    CLOSE_SENT = "close sent"  # we sent Close; waiting for the peer's
    CLOSED = "closed"  # we sent Close and the connection is over
    LOST = "lost"  # the connection ended without a Close from us


class SocketInput(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code

    HANDSHAKE_DONE = "handshake done"
    HANDSHAKE_FAILED = "handshake failed"
    PEER_CLOSE = "peer sent Close"
    APP_CLOSE = "application or runtime sent Close"
    TRANSPORT_LOST = "connection lost"
    FAIL = "protocol failure"


class Final(enum.Enum):
    """Which final event a socket move produces (SPEC §5: exactly one per socket)."""

    __hash__ = object.__hash__  # members are singletons; Enum's own hash is Python code

    NONE = "none"
    CLOSE = "web_socket_close"
    ERROR = "web_socket_error"


T = SocketState
U = SocketInput

#: ``(state, input) -> (next state, final event to queue)``.
#: A socket's final event is queued by exactly one move, so it is never sent twice.
#: ``send()`` raises in CLOSE_SENT and CLOSED (SPEC §5: after ``close()``), and
#: is a no-op in LOST, where the peer is gone and its close event is on its way.
SOCKET_TRANSITIONS: dict[tuple[SocketState, SocketInput], tuple[SocketState, Final]] = {
    (T.CONNECTING, U.HANDSHAKE_DONE): (T.OPEN, Final.NONE),
    # A socket whose handshake never completed was never seen by the peer.
    (T.CONNECTING, U.HANDSHAKE_FAILED): (T.LOST, Final.NONE),
    # close() before the handshake completes: the Close goes out right after it.
    (T.CONNECTING, U.APP_CLOSE): (T.CLOSE_SENT, Final.NONE),
    (T.CLOSE_SENT, U.HANDSHAKE_DONE): (T.CLOSE_SENT, Final.NONE),
    (T.CLOSE_SENT, U.HANDSHAKE_FAILED): (T.CLOSED, Final.NONE),
    (T.OPEN, U.PEER_CLOSE): (T.CLOSE_RECEIVED, Final.CLOSE),
    (T.OPEN, U.APP_CLOSE): (T.CLOSE_SENT, Final.NONE),
    (T.OPEN, U.TRANSPORT_LOST): (T.LOST, Final.CLOSE),
    # The runtime itself sent the Close (1002, 1007, 1009) before failing the socket.
    (T.OPEN, U.FAIL): (T.CLOSED, Final.ERROR),
    # Our answer to the peer's Close completes the closing handshake.
    (T.CLOSE_RECEIVED, U.APP_CLOSE): (T.CLOSED, Final.NONE),
    (T.CLOSE_RECEIVED, U.TRANSPORT_LOST): (T.LOST, Final.NONE),
    # The peer's answer to our Close (RFC 6455 §5.5.1) ends the handshake cleanly.
    (T.CLOSE_SENT, U.PEER_CLOSE): (T.CLOSED, Final.CLOSE),
    # SPEC §5: "a second close() is ignored".
    (T.CLOSE_SENT, U.APP_CLOSE): (T.CLOSE_SENT, Final.NONE),
    (T.CLOSE_SENT, U.TRANSPORT_LOST): (T.CLOSED, Final.CLOSE),
    (T.CLOSE_SENT, U.FAIL): (T.CLOSED, Final.ERROR),
    (T.CLOSED, U.APP_CLOSE): (T.CLOSED, Final.NONE),
    # The transport reports its end after the closing handshake already finished.
    (T.CLOSED, U.TRANSPORT_LOST): (T.CLOSED, Final.NONE),
    # close() on a socket whose peer is gone sends nothing, but later sends raise.
    (T.LOST, U.APP_CLOSE): (T.CLOSED, Final.NONE),
    (T.LOST, U.TRANSPORT_LOST): (T.LOST, Final.NONE),
}

del T, U


def socket_transition(state: SocketState, what: SocketInput) -> tuple[SocketState, Final]:
    """The row for ``(state, what)``; raises :class:`NoTransitionError` if there is none."""
    row = SOCKET_TRANSITIONS.get((state, what))
    if row is None:
        raise NoTransitionError(state, what)
    return row


# -- the closing handshake on the wire ---------------------------------------------------


class WireState(enum.Enum):
    """Where one connection's closing handshake is on the wire (RFC 6455 §7).

    Not the socket's state above: a Close the object sends may wait behind the output
    gate (the socket is ``close sent``, nothing is written yet); this table moves when
    a Close is really written or read."""

    __hash__ = object.__hash__

    OPEN = "open"
    CLOSE_SENT = "close written"  # our Close is on the wire; waiting for the peer's
    CLOSE_RECEIVED = "close read"  # the peer's Close arrived; ours is not written yet
    CLOSED = "closed"  # both Closes crossed: the server closes TCP first (§7.1.1)
    FAILED = "failed"  # we failed the connection (1002, 1007, 1008, 1009): no more frames


class WireInput(enum.Enum):
    __hash__ = object.__hash__

    WROTE_CLOSE = "wrote Close"
    READ_CLOSE = "read Close"
    FAIL = "protocol failure"  # write Close(code) unless ours is out, FIN, drain, close
    CUT = "cut"  # a peer that does not read: abort at once (its queue is dropped)


class WireEffect(enum.Enum):
    __hash__ = object.__hash__

    NOTHING = "nothing"
    WAIT_FOR_PEER = "wait close_timeout for the peer's Close"
    CLOSE_TRANSPORT = "close TCP (cancel the wait)"
    FAIL_WITH_CLOSE = "write Close(code), FIN, drain"
    FAIL_SILENTLY = "FIN, drain"
    ABORT = "abort TCP"


W, V, X = WireState, WireInput, WireEffect

#: ``(state, input) -> (next state, what the connection does)``.
WIRE_TRANSITIONS: dict[tuple[WireState, WireInput], tuple[WireState, WireEffect]] = {
    (W.OPEN, V.WROTE_CLOSE): (W.CLOSE_SENT, X.WAIT_FOR_PEER),
    (W.OPEN, V.READ_CLOSE): (W.CLOSE_RECEIVED, X.NOTHING),
    (W.OPEN, V.FAIL): (W.FAILED, X.FAIL_WITH_CLOSE),
    (W.OPEN, V.CUT): (W.FAILED, X.ABORT),
    (W.CLOSE_SENT, V.READ_CLOSE): (W.CLOSED, X.CLOSE_TRANSPORT),
    (W.CLOSE_SENT, V.FAIL): (W.FAILED, X.FAIL_SILENTLY),
    (W.CLOSE_SENT, V.CUT): (W.FAILED, X.ABORT),
    (W.CLOSE_RECEIVED, V.WROTE_CLOSE): (W.CLOSED, X.CLOSE_TRANSPORT),
    (W.CLOSE_RECEIVED, V.READ_CLOSE): (W.CLOSE_RECEIVED, X.NOTHING),
    (W.CLOSE_RECEIVED, V.FAIL): (W.FAILED, X.FAIL_WITH_CLOSE),
    (W.CLOSE_RECEIVED, V.CUT): (W.FAILED, X.ABORT),
    (W.CLOSED, V.READ_CLOSE): (W.CLOSED, X.NOTHING),
    (W.CLOSED, V.FAIL): (W.FAILED, X.FAIL_SILENTLY),
    (W.CLOSED, V.CUT): (W.FAILED, X.ABORT),
    # A failed connection writes nothing more and reads nothing more; a late cut aborts it.
    (W.FAILED, V.WROTE_CLOSE): (W.FAILED, X.NOTHING),
    (W.FAILED, V.READ_CLOSE): (W.FAILED, X.NOTHING),
    (W.FAILED, V.FAIL): (W.FAILED, X.NOTHING),
    (W.FAILED, V.CUT): (W.FAILED, X.ABORT),
}


def wire_transition(state: WireState, what: WireInput) -> tuple[WireState, WireEffect]:
    """The row for ``(state, what)``; raises :class:`NoTransitionError` if there is none."""
    row = WIRE_TRANSITIONS.get((state, what))
    if row is None:
        raise NoTransitionError(state, what)
    return row


def transition_tables_markdown() -> str:
    """The transition tables as Markdown, for docs/internals.md (a test keeps them in sync)."""
    lines = ["| state | input | next state | effects |", "|---|---|---|---|"]
    for (state, what), (after, actions) in OBJECT_TRANSITIONS.items():
        effects = "; ".join(a.value for a in actions)
        lines.append(f"| {state.value} | {what.value} | {after.value} | {effects} |")
    lines += ["", "| socket state | input | next state | final event queued |", "|---|---|---|---|"]
    for (sstate, swhat), (safter, final) in SOCKET_TRANSITIONS.items():
        lines.append(f"| {sstate.value} | {swhat.value} | {safter.value} | {final.value} |")
    lines += ["", "| on the wire | input | next | the connection |", "|---|---|---|---|"]
    for (wstate, wwhat), (wafter, effect) in WIRE_TRANSITIONS.items():
        lines.append(f"| {wstate.value} | {wwhat.value} | {wafter.value} | {effect.value} |")
    return "\n".join(lines) + "\n"
