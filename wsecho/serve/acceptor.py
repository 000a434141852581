"""Accepting connections without spinning when descriptors run out, and the descriptor budget."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


#: Descriptors kept free under RLIMIT_NOFILE, beyond those open at start, for the admin
#: listener, storage and logs (an eighth of the limit, at most this): connections beyond
#: the rest are closed at accept.
MAX_RESERVED_FDS = 64
#: When accept() fails for lack of descriptors or memory, the listener pauses this long,
#: doubling up to the maximum while it keeps failing (Go's net/http: 5 ms up to 1 s).
ACCEPT_BACKOFF = 0.05
MAX_ACCEPT_BACKOFF = 1.0
#: A repeated warning (out of descriptors, connections refused) is logged at most this often.
WARNING_INTERVAL = 60.0
#: accept() errors that a pause cures: the process or the system ran out of descriptors,
#: or the kernel out of buffers. Retrying at once would fail again (the listener stays
#: readable), so the loop would spin.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RateLimitedWarning:
    """One warning line at most every :data:`WARNING_INTERVAL`, counting what it held back."""

    __slots__ = ("_held", "_last", "_logger")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: float | None = None
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < WARNING_INTERVAL:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} more like it in the last {WARNING_INTERVAL:g}s were not logged)" if held else ""
        self._logger.warning(message + suffix, *args)


def open_file_limit() -> int | None:
    """RLIMIT_NOFILE's soft limit (``ulimit -n``), or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def descriptors_in_use() -> int:
    """How many descriptors the process holds (storage, logs, listeners); 32 where unknown."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing it
    except OSError:
        return 32


class Acceptor:
    """Accepts connections on one listening socket, in place of ``tornado.netutil.add_accept_handler``.

    Tornado's handler lets accept() errors escape, and the IOLoop calls it again at once,
    since the listener stays readable: out of descriptors (EMFILE) it spins at 100% CPU and
    logs a traceback per pass. This one pauses the listener instead, like Go's net/http and
    uvicorn: the pending connections wait in the kernel's queue until descriptors are free.
    """

    __slots__ = ("_backoff", "_batch", "_on_connection", "_on_pause", "_removed", "_timer", "sock")

    def __init__(
        self,
        sock: socket.socket,
        on_connection: Callable[[socket.socket, Any], None],
        on_pause: Callable[[OSError, float], None],
        batch: int,
    ) -> None:
        self.sock = sock
        self._on_connection = on_connection
        self._on_pause = on_pause
        # Like Tornado: at most a backlog's worth per wake-up, so other work is not starved.
        self._batch = batch
        self._backoff = ACCEPT_BACKOFF
        self._removed = False
        self._timer: object | None = None
        IOLoop.current().add_handler(sock, self._ready, IOLoop.READ)

    def _ready(self, fd: object, events: int) -> None:
        for _ in range(self._batch):
            if self._removed:
                return
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                return  # every pending connection is taken
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client left while in the queue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._pause(exc)
                return
            self._backoff = ACCEPT_BACKOFF
            self._on_connection(conn, address)

    def _pause(self, exc: OSError) -> None:
        loop = IOLoop.current()
        loop.remove_handler(self.sock)
        delay, self._backoff = self._backoff, min(self._backoff * 2, MAX_ACCEPT_BACKOFF)
        self._timer = loop.call_later(delay, self._resume)
        self._on_pause(exc, delay)

    def _resume(self) -> None:
        self._timer = None
        if not self._removed:
            IOLoop.current().add_handler(self.sock, self._ready, IOLoop.READ)

    def remove(self) -> None:
        """Stop accepting (what ``TCPServer.stop`` calls)."""
        if self._removed:
            return
        self._removed = True
        loop = IOLoop.current()
        if self._timer is not None:
            loop.remove_timeout(self._timer)
            self._timer = None
        else:
            loop.remove_handler(self.sock)
