"""SIGINT/SIGTERM: the flag every phase checks, and the bounded polling wait that checks it.

Besides cancelling the main task, the signal handler sets the flag, because Python 3.11's
``wait_for()`` can lose a cancellation that races with its result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Interrupt:
    """Whether SIGINT or SIGTERM came; once set, it stays set."""

    def __init__(self) -> None:
        self.is_set = False

    def set(self) -> None:
        self.is_set = True


#: The one flag of this process, set by the signal handler of :func:`benchkit.cli.main_async`.
INTERRUPT = Interrupt()


def check_interrupted() -> None:
    """Cancel the phase that calls it once the benchmark was interrupted."""
    if INTERRUPT.is_set:
        raise asyncio.CancelledError


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        check_interrupted()
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True
