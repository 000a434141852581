"""Fan-out, sans-IO: one message for many sockets, encoded once, and what to do with a slow one.

``ctx.broadcast(message)`` builds one :class:`Fanout`: the server frame is built once, and the
permessage-deflate frame once per window size that a compressed socket asked for. That is
correct because wsecho's server compresses every message on its own
(``server_no_context_takeover``, see :mod:`wsecho.core.deflate`): the compressed frame depends
on the message and the window, not on the socket, so every compressed socket with the same
window takes the same bytes.

A socket whose send queue holds more than :attr:`FanoutPolicy.queue_bytes` does not get the
message: with :attr:`Overflow.DROP` it misses this one (counted) and gets later ones once its
queue drained; with :attr:`Overflow.CLOSE` its connection is cut with 1008. Either way one
stalled reader cannot slow the others or hold more than its limit in the server's memory.
"""

from __future__ import annotations

import enum

import attrs

from wsecho.core import frames
from wsecho.core.errors import InvalidArgumentError

#: The smallest per-socket queue limit: the transports' high-water mark (64 KiB), below which
#: a queue is never measured (a socket that keeps up costs one attribute test per send).
MIN_QUEUE_BYTES = 64 * 1024


class Overflow(enum.Enum):
    """What a broadcast does to a socket whose queue is over its limit."""

    #: That socket misses the message (``wsecho_fanout_dropped``); the others get it.
    DROP = "drop"
    #: That socket is cut with 1008 (``wsecho_fanout_closed``); its object gets ``web_socket_error``.
    CLOSE = "close"


@attrs.frozen
class FanoutPolicy:
    """A class's slow-consumer policy for ``ctx.broadcast``."""

    overflow: Overflow
    queue_bytes: int


def policy_for(name: str, overflow: object, queue_bytes: object, default_bytes: int) -> FanoutPolicy:
    """The policy of the class ``name`` from its ``fanout_overflow`` and ``fanout_queue_bytes``
    (None: ``default_bytes``, the server's ``--max-fanout-queue``); raises naming a bad value."""
    choices = ", ".join(repr(o.value) for o in Overflow)
    if not isinstance(overflow, str) or overflow not in {o.value for o in Overflow}:
        msg = f"{name}.fanout_overflow must be one of {choices}, got {overflow!r}"
        raise InvalidArgumentError(msg)
    size = default_bytes if queue_bytes is None else queue_bytes
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_QUEUE_BYTES:
        msg = f"{name}.fanout_queue_bytes must be an integer of at least {MIN_QUEUE_BYTES} (or None), got {size!r}"
        raise InvalidArgumentError(msg)
    return FanoutPolicy(Overflow(overflow), size)


class Fanout:
    """One broadcast message: its server frame, built once, and its compressed frames, built
    once per window size on first use."""

    __slots__ = ("_deflated", "frame", "message", "policy")

    def __init__(self, message: str | bytes, policy: FanoutPolicy) -> None:
        self.message = message
        self.policy = policy
        self.frame = frames.message_frame(message)
        self._deflated: dict[int, bytes] = {}

    def deflated(self, window_bits: int) -> bytes:
        """The permessage-deflate frame for a socket that lets the server use ``2**window_bits``."""
        frame = self._deflated.get(window_bits)
        if frame is None:
            frame = self._deflated[window_bits] = frames.deflated_frame(self.message, window_bits)
        return frame
