"""The stop signals of a serving process, one way for the single server and the supervisor of
``--workers N``: the first SIGTERM or SIGINT asks for a graceful stop, a second one exits at
once (status 1), and SIGHUP calls the process's own handler."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger("wsecho")


async def until_stopped(
    on_hup: Callable[[], None],
    *,
    at_once: str = "exiting at once",
    before_exit: Callable[[], None] | None = None,
) -> signal.Signals:
    """Install the handlers and wait for the first stop signal; return it.

    The handlers stay installed while the caller drains, so a second stop signal still exits
    at once: it logs ``second SIGTERM: <at_once>``, calls ``before_exit`` (the supervisor kills
    its workers) and leaves without unwinding."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[signal.Signals] = loop.create_future()

    def on_stop(signum: int) -> None:
        if not stopped.done():
            stopped.set_result(signal.Signals(signum))
            return
        log.warning("second %s: %s", signal.Signals(signum).name, at_once)
        if before_exit is not None:
            before_exit()
        logging.shutdown()
        os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return await stopped
