"""HTTP values as the application sees them: ``Headers``, ``Request`` and ``Response``.

They follow the Fetch API that Cloudflare's examples use: ``request.url`` is the
full URL string (query included), header names are case-insensitive and
``headers.get`` joins repeated fields with ", ".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from wsecho.core.errors import InvalidArgumentError

if TYPE_CHECKING:
    from wsecho.api.websocket import WebSocket

#: The Content-Type the Fetch API gives a Response built from a string.
TEXT_PLAIN = "text/plain;charset=UTF-8"

HeadersInit = Mapping[str, str] | Iterable[tuple[str, str]] | None


class Headers:
    """Case-insensitive HTTP header fields that keep their order and repeats."""

    __slots__ = ("_fields",)

    def __init__(self, init: HeadersInit | Headers = None) -> None:
        self._fields: list[tuple[str, str]] = []
        if init is None:
            return
        pairs = init.items() if isinstance(init, Mapping | Headers) else init
        for name, value in pairs:
            self.append(name, value)

    def append(self, name: str, value: str) -> None:
        self._fields.append((str(name), str(value)))

    def set(self, name: str, value: str) -> None:
        self.delete(name)
        self.append(name, value)

    def delete(self, name: str) -> None:
        lower = name.lower()
        self._fields = [(n, v) for n, v in self._fields if n.lower() != lower]

    def get(self, name: str, default: str | None = None) -> str | None:
        """All values of ``name`` joined with ", ", or ``default`` if there are none."""
        lower = name.lower()
        values = [v for n, v in self._fields if n.lower() == lower]
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for n, v in self._fields if n.lower() == lower]

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(n for n, _ in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


def _to_headers(value: HeadersInit | Headers) -> Headers:
    return value if isinstance(value, Headers) else Headers(value)


def _to_body(value: str | bytes | bytearray | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    msg = f"a body must be str, bytes or None, not {type(value).__name__}"
    raise InvalidArgumentError(msg)


def _to_request_body(value: str | bytes | bytearray | None) -> bytes:
    return _to_body(value) or b""


@attrs.define(eq=False)
class Request:
    """An HTTP request: ``method``, the full ``url`` string, ``headers`` and ``body``."""

    url: str
    method: str = "GET"
    headers: Headers = attrs.field(factory=Headers, converter=_to_headers)
    body: bytes = attrs.field(default=b"", converter=_to_request_body)

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class Response:
    """An HTTP response; ``Response(status=101, web_socket=client)`` completes an upgrade.

    A ``str`` body gets ``Content-Type: text/plain;charset=UTF-8`` unless the
    headers name one, as in the Fetch API.
    """

    __slots__ = ("body", "headers", "status", "web_socket")

    def __init__(
        self,
        body: str | bytes | bytearray | None = None,
        status: int = 200,
        headers: HeadersInit | Headers = None,
        web_socket: WebSocket | None = None,
    ) -> None:
        if not isinstance(status, int) or not (101 <= status <= 599):
            msg = f"status must be an integer from 101 to 599, got {status!r}"
            raise InvalidArgumentError(msg)
        if status == 101 and web_socket is None:
            msg = "a 101 Response needs web_socket= (the client end of a WebSocketPair)"
            raise InvalidArgumentError(msg)
        self.headers = _to_headers(headers)
        if isinstance(body, str) and "content-type" not in self.headers:
            self.headers.set("Content-Type", TEXT_PLAIN)
        self.body = _to_body(body)
        self.status = status
        self.web_socket = web_socket

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
