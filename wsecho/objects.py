"""What application code touches about objects: ids, namespaces, stubs, ``ctx`` and the base class.

Every call that needs to find or wake an object goes through the
:class:`~wsecho.runtime.Runtime` these hold; nothing here keeps a module-level
registry, so one process can run several runtimes (and placement can later move
behind the namespace without changing this API).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from wsecho.errors import InvalidArgumentError, InvalidStateError
from wsecho.http import Request
from wsecho.lifecycle import SocketState

if TYPE_CHECKING:
    from wsecho.http import Response
    from wsecho.runtime import ObjectHost, Runtime
    from wsecho.websocket import WebSocket

#: Cloudflare's limit on hibernatable sockets per object (SPEC §4).
MAX_SOCKETS_PER_OBJECT = 32_768

_HEX_ID = re.compile(r"[0-9a-f]{64}")


@attrs.frozen(repr=False)
class DurableObjectId:
    """An object's identity within its namespace: 64 lowercase hex digits."""

    namespace: str
    hex: str
    #: The name given to ``id_from_name``; None for unique and parsed ids.
    name: str | None = attrs.field(default=None, eq=False)

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        label = f" name={self.name!r}" if self.name is not None else ""
        return f"<DurableObjectId {self.namespace}:{self.hex[:12]}…{label}>"

    def to_string(self) -> str:
        return self.hex


class DurableObjectNamespace:
    """A binding (``env.NAME``): turns names and strings into ids, ids into stubs."""

    __slots__ = ("_cls", "_runtime", "name")

    def __init__(self, name: str, cls: type[DurableObject], runtime: Runtime) -> None:
        self.name = name
        self._cls = cls
        self._runtime = runtime

    def __repr__(self) -> str:
        return f"<DurableObjectNamespace {self.name} of {self._cls.__name__}>"

    def id_from_name(self, name: str) -> DurableObjectId:
        """The same name always gives the same id (in this namespace)."""
        if not isinstance(name, str):
            msg = f"id_from_name() takes a str, not {type(name).__name__}"
            raise InvalidArgumentError(msg)
        digest = hashlib.sha256(f"{self.name}\0{name}".encode()).hexdigest()
        return DurableObjectId(self.name, digest, name)

    def new_unique_id(self) -> DurableObjectId:
        return DurableObjectId(self.name, secrets.token_hex(32))

    def id_from_string(self, value: str) -> DurableObjectId:
        if not isinstance(value, str) or not _HEX_ID.fullmatch(value):
            msg = f"id_from_string() takes 64 lowercase hex digits, got {value!r}"
            raise InvalidArgumentError(msg)
        return DurableObjectId(self.name, value)

    def get(self, id: DurableObjectId) -> DurableObjectStub:  # noqa: A002 - Cloudflare's name
        if not isinstance(id, DurableObjectId) or id.namespace != self.name:
            msg = f"get() takes an id made by env.{self.name}, got {id!r}"
            raise InvalidArgumentError(msg)
        return DurableObjectStub(self, id)

    def get_by_name(self, name: str) -> DurableObjectStub:
        return self.get(self.id_from_name(name))


class DurableObjectStub:
    """A handle on one object; calls are delivered in the object's turn."""

    __slots__ = ("_namespace", "id")

    def __init__(self, namespace: DurableObjectNamespace, id: DurableObjectId) -> None:  # noqa: A002
        self._namespace = namespace
        self.id = id

    @property
    def name(self) -> str | None:
        return self.id.name

    def __repr__(self) -> str:
        return f"<DurableObjectStub {self.id!r}>"

    async def fetch(self, request: Request | str, **init: Any) -> Response:
        """Deliver ``request`` (or a URL string) to the object's ``fetch`` handler."""
        if isinstance(request, str):
            request = Request(request, **init)
        elif not isinstance(request, Request):
            msg = f"fetch() takes a Request or a URL string, not {type(request).__name__}"
            raise InvalidArgumentError(msg)
        ns = self._namespace
        return await ns._runtime.fetch_object(ns.name, ns._cls, self.id, request)


class Env:
    """The ``env`` argument: one attribute per binding, read-only."""

    __slots__ = ("_bindings",)
    _bindings: dict[str, Any]

    def __init__(self, bindings: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_bindings", dict(bindings))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._bindings[name]
        except KeyError:
            msg = f"env has no binding {name!r}"
            raise AttributeError(msg) from None

    def __setattr__(self, name: str, value: Any) -> None:
        msg = "env is read-only"
        raise AttributeError(msg)

    def __dir__(self) -> list[str]:
        return sorted(self._bindings)


class DurableObjectState:
    """``ctx``: the runtime's side of one object, handed to its constructor.

    A new one is made for every instance, so nothing stored on it survives a
    hibernation; what does survive (the sockets and their state) lives in the
    object's host.
    """

    __slots__ = ("_host", "_runtime")

    def __init__(self, host: ObjectHost, runtime: Runtime) -> None:
        self._host = host
        self._runtime = runtime

    @property
    def id(self) -> DurableObjectId:
        return self._host.id

    def accept_web_socket(self, ws: WebSocket, tags: tuple[str, ...] | list[str] = ()) -> None:
        """Make ``ws`` (the server end of a pair) a hibernatable socket of this object."""
        host = self._host
        if ws._host is not None:
            msg = "accept_web_socket(): this WebSocket was already accepted"
            raise InvalidStateError(msg)
        if ws._peer is None or ws._state is not SocketState.CONNECTING:
            msg = "accept_web_socket() takes the server end of a new WebSocketPair"
            raise InvalidStateError(msg)
        if len(host.sockets) >= MAX_SOCKETS_PER_OBJECT:
            msg = (
                f"accept_web_socket(): this object already has {len(host.sockets)} "
                f"WebSockets; the limit is {MAX_SOCKETS_PER_OBJECT}"
            )
            raise InvalidStateError(msg)
        ws._host = host
        ws._hibernatable = True
        host.sockets[ws] = None

    def get_web_sockets(self, tag: str | None = None) -> list[WebSocket]:
        """Every socket of this object whose final event has not been delivered yet."""
        return list(self._host.sockets)


class DurableObject:
    """Base class of application objects.

    Subclasses may define, each sync or async: ``fetch(request)``,
    ``web_socket_message(ws, message)``, ``web_socket_close(ws, code, reason,
    was_clean)``, ``web_socket_error(ws, error)``.
    A class attribute ``hibernate_after`` (seconds) overrides the server's setting.
    """

    hibernate_after: ClassVar[float | None] = None

    def __init__(self, ctx: DurableObjectState, env: Env) -> None:
        self.ctx = ctx
        self.env = env
