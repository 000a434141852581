"""The systemd notify protocol (``sd_notify``): telling the service manager we are ready, alive, stopping.

This module owns the one datagram socket that talks to ``$NOTIFY_SOCKET`` and the
reading of the ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID`` variables. It is
stdlib only, so wsecho needs no libsystemd binding.

The server may call every method unconditionally: outside systemd (no
``NOTIFY_SOCKET``) they are no-ops, and a notification that cannot be delivered is
dropped with a warning, never raised, because a lost status line must not take the
server down. Sending never blocks the event loop: the socket is non-blocking and a
datagram that does not fit the receiver's queue is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from types import TracebackType

log = logging.getLogger("wsecho.systemd")


def _socket_address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as an ``AF_UNIX`` address, or None (with a warning) if systemd would refuse it."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux's abstract namespace: the name begins with a NUL byte instead of "@".
        return "\0" + value[1:]
    # Like libsystemd's sd_notify: a relative path or another scheme is not for us.
    log.warning("ignoring NOTIFY_SOCKET=%r: expected an absolute path or @abstract-name", value)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` if the watchdog is enabled for this very process, else None."""
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            pid = int(pid_text, 10)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a process id", pid_text)
            return None
        # systemd names the process it watches; a child that inherited the variables must
        # not ping on its parent's behalf.
        if pid != os.getpid():
            return None
    try:
        usec = int(usec_text, 10)
    except ValueError:
        log.warning("ignoring the watchdog: WATCHDOG_USEC=%r is not a number of microseconds", usec_text)
        return None
    if usec <= 0:
        log.warning("ignoring the watchdog: WATCHDOG_USEC=%r is not positive", usec_text)
        return None
    return usec


def _check_assignment(assignment: str) -> None:
    name, equals, _ = assignment.partition("=")
    if not name or not equals:
        msg = f"a notification is NAME=value, got {assignment!r}"
        raise ValueError(msg)
    if "\n" in assignment:
        # systemd splits the datagram on newlines: this would smuggle in a second assignment.
        msg = f"a notification must not contain a newline, got {assignment!r}"
        raise ValueError(msg)


class Notifier:
    """Sends ``sd_notify`` messages to the service manager, if there is one.

    Build it with :meth:`from_environ`. Methods return True when the message went out
    and False when there is no manager to tell, the notifier is closed, or delivery
    failed (logged once on ``wsecho.systemd`` until a send succeeds again).
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` is an ``AF_UNIX`` address (abstract names start with NUL), None disables."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._closed = False
        # Warn once per outage: the watchdog pings every few seconds and would flood the log.
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; ``environ`` is left as it is."""
        value = environ.get("NOTIFY_SOCKET")
        address = _socket_address(value) if value else None
        return cls(address, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings (half of ``WATCHDOG_USEC``), or None if not enabled.

        None too without ``NOTIFY_SOCKET``: a ping could not reach anyone.
        """
        if self._watchdog_usec is None or self._address is None:
            return None
        # Half the timeout, as sd_watchdog_enabled(3) advises, so one late ping is not fatal.
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        """Startup is finished: sockets are bound and storage is open."""
        return self.send("READY=1")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """The configuration is being reloaded; send :meth:`ready` when done."""
        return self.send("RELOADING=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``; line breaks become spaces."""
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Tell the watchdog we are alive; call it every :attr:`watchdog_interval` seconds."""
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send ``NAME=value`` assignments in one datagram.

        A malformed assignment is a bug in the caller and raises ValueError even
        without a service manager, so it shows up in tests; delivery problems never raise.
        """
        if not assignments:
            msg = "send() needs at least one NAME=value assignment"
            raise ValueError(msg)
        for assignment in assignments:
            _check_assignment(assignment)
        if self._address is None or self._closed:
            return False
        data = "\n".join(assignments).encode("utf-8")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            # sendto, not connect: if the manager re-creates its socket (daemon-reexec),
            # the next datagram still finds it.
            self._sock.sendto(data, self._address)
        except OSError as exc:
            # Includes BlockingIOError (the manager's queue is full): drop rather than block.
            self._failed(exc)
            return False
        self._warned = False
        return True

    def _failed(self, exc: OSError) -> None:
        shown = self._address.replace("\0", "@", 1) if self._address else self._address
        if self._warned:
            log.debug("cannot notify systemd at %s: %s", shown, exc)
            return
        self._warned = True
        log.warning("cannot notify systemd at %s: %s (further failures are logged at debug)", shown, exc)

    def close(self) -> None:
        """Close the socket; later messages are dropped."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        shown = self._address.replace("\0", "@", 1) if self._address else None
        return f"Notifier(address={shown!r}, watchdog_interval={self.watchdog_interval!r})"
