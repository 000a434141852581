"""The blocked-loop watchdog: a real thread watching a real loop that a handler blocks."""

import logging
import threading

import pytest

from tests.helpers import until
from wsecho.runtime.watchdog import LoopWatchdog


class Signal(logging.Handler):
    """Sets an event when the watchdog logs, so the blocked loop can be let go."""

    def __init__(self):
        super().__init__()
        self.records = []
        self.logged = threading.Event()

    def emit(self, record):
        self.records.append(record.getMessage())
        self.logged.set()


@pytest.fixture
def signal():
    handler = Signal()
    logger = logging.getLogger("wsecho.runtime.watchdog")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def a_handler_that_blocks_the_loop(released: threading.Event) -> bool:
    # Red team L9: stands for time.sleep() or a CPU-bound loop in a handler. It waits
    # (bounded) for the watchdog's warning, which only a thread can give while it blocks.
    return released.wait(10)


@pytest.mark.gen_test(timeout=20)
async def test_a_blocked_loop_is_reported_with_the_code_that_blocks_it(signal):
    watchdog = LoopWatchdog(0.05)
    watchdog.start()
    try:
        assert a_handler_that_blocks_the_loop(signal.logged), "no warning while the loop was blocked"
        warning = signal.records[0]
        assert "the event loop has been blocked for" in warning
        assert "over --warn-blocked 0.05 s" in warning
        assert "a_handler_that_blocks_the_loop" in warning  # the stack names the culprit
        assert "released.wait(10)" in warning
        await until(lambda: len(signal.records) == 2)
        assert signal.records[1].startswith("the event loop runs again after being blocked for")
        assert watchdog.episodes == 1
    finally:
        watchdog.stop()


def test_a_loop_that_keeps_running_is_never_reported(signal):
    ticks = iter([0.0, 0.0, 0.04, 0.04, 0.08])
    watchdog = LoopWatchdog(0.05, clock=lambda: next(ticks))
    watchdog._last_beat = 0.0
    watchdog.check()  # 0.04 s since the beat: under the threshold
    assert signal.records == []
    assert watchdog.episodes == 0
