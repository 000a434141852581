"""Every exception wsecho raises, in one place.

All of them derive from :class:`WsechoError`. A bad argument is also a
:class:`ValueError`, a call in the wrong state is also a :class:`RuntimeError`,
so callers that know nothing of wsecho can still catch them the usual way.
Messages say what was wrong and quote the limit and the value.
"""

from __future__ import annotations


class WsechoError(Exception):
    """Base class of every error wsecho raises."""


class InvalidArgumentError(WsechoError, ValueError):
    """An argument is outside what the API accepts (a limit, a type, a code)."""


class InvalidStateError(WsechoError, RuntimeError):
    """A call that the object or socket cannot take in its current state."""


class NotOwnerError(InvalidStateError):
    """The object belongs to another process (a worker of ``--workers N``, or another member
    of a cluster), which must serve it; the client is told to try again (503)."""

    def __init__(self, message: str, hex_id: str = "") -> None:
        super().__init__(message)
        #: The object's id (64 hex digits), for routing the client to its owner.
        self.hex_id = hex_id


class NoTransitionError(InvalidStateError):
    """The lifecycle table has no row for this (state, input); nothing changed."""

    def __init__(self, state: object, event: object) -> None:
        self.state = state
        self.event = event
        msg = f"no transition from state {state!r} on input {event!r}"
        super().__init__(msg)


class ConfigError(WsechoError, ValueError):
    """A setting (flag or environment variable) has a value it cannot take."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")


class AppLoadError(WsechoError):
    """The application named on the command line could not be loaded."""


class WebSocketProtocolError(WsechoError):
    """What ``web_socket_error`` receives: the runtime closed the socket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"closed with {code}: {reason}")


class OutboundConnectError(WsechoError, ConnectionError):
    """``ctx.connect_web_socket(url)`` could not open its connection: the upstream answered the
    handshake with ``status`` (not 101), or (``status`` None) it could not be reached in time."""

    def __init__(self, url: str, status: int | None, message: str) -> None:
        self.url = url
        self.status = status
        super().__init__(message)


class ObjectResetError(WsechoError, RuntimeError):
    """An event was dropped because its object was reset before it could run."""


class StorageError(WsechoError):
    """The storage backend failed (a disk error, a locked or too-new database)."""


class SqlError(WsechoError):
    """A statement of ``ctx.storage.sql.exec()`` failed (SQLite's message), or was refused
    because it would reach outside the object's database (``ATTACH``, a durability
    ``PRAGMA``, ``VACUUM INTO``, a transaction statement: use ``transaction_sync``)."""


class QuotaExceededError(WsechoError):
    """A write would take an object, or all objects together, past a storage quota.

    Nothing of the refused call is stored; the object keeps serving, and deleting
    data makes room again."""


class BadRequestError(WsechoError, ValueError):
    """A request the server refuses before the application sees it; ``status`` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)
