"""Warns while the event loop is blocked, and names the code that blocks it.

Every socket, timer and HTTP request of a server shares one event loop, so a
handler that blocks it (``time.sleep``, a slow synchronous call, a CPU-bound loop,
an ``async`` handler that never awaits) stalls every object and even ``/healthz``.
Python cannot interrupt such a handler. What the server can do is say so, while it
happens: a heartbeat callback on the loop stamps the time, and a thread checks the
stamp; once it is older than the threshold, the thread logs one warning with the
loop thread's current stack (the handler's file, line and function), and one line
when the loop runs again. Unlike asyncio's debug mode (``slow_callback_duration``),
this costs nothing per callback and reports a handler that never returns.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Frames of the loop thread's stack shown in the warning (the innermost ones).
STACK_FRAMES = 12


class LoopWatchdog:
    """Started on the loop's thread with :meth:`start`; :meth:`stop` ends its thread."""

    def __init__(self, threshold: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self._clock = clock
        #: How often the loop stamps the time and the thread looks at the stamp.
        self.interval = min(max(threshold / 4, 0.005), 0.5)
        self._last_beat = clock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._beat_handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: How many times the loop was found blocked (one per episode).
        self.episodes = 0
        self._blocked_since: float | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="wsecho-loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._beat_handle is not None:
            self._beat_handle.cancel()
            self._beat_handle = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _beat(self) -> None:
        self._last_beat = self._clock()
        assert self._loop is not None
        self._beat_handle = self._loop.call_later(self.interval, self._beat)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def check(self) -> None:
        """One look at the heartbeat (the thread calls this every ``interval``)."""
        last = self._last_beat
        blocked = self._clock() - last
        if self._blocked_since is None:
            if blocked > self.threshold:
                self._blocked_since = last
                self.episodes += 1
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame, limit=STACK_FRAMES)) if frame else "(unknown)\n"
                log.warning(
                    "the event loop has been blocked for %.2f s (over --warn-blocked %g s): every WebSocket, "
                    "timer and request waits. Handlers must not block: await, or move blocking work to "
                    "asyncio.to_thread(). The loop is running:\n%s",
                    blocked,
                    self.threshold,
                    stack.rstrip("\n"),
                )
        elif last > self._blocked_since:
            log.warning("the event loop runs again after being blocked for %.2f s", last - self._blocked_since)
            self._blocked_since = None
