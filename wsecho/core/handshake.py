"""The WebSocket opening handshake's rules (RFC 6455 §4.2): what makes an upgrade request valid,
and the ``Sec-WebSocket-Accept`` answer. Headers come in as a mapping; no I/O."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

#: RFC 6455 §1.3: appended to the client's key to compute Sec-WebSocket-Accept.
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Handshake response headers that the server computes itself (an application's are ignored).
HANDSHAKE_HEADERS = frozenset(
    {"upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions"}
)


def handshake_problem(method: str, version: str, headers: Mapping[str, str]) -> tuple[int, str] | None:
    """Why a request the application answered with 101 cannot be upgraded (RFC 6455 §4.2.1).

    A wrong method gets 400, not 405: the application routes every request, so the gateway
    cannot know which methods the resource allows (405 must list them in ``Allow``).
    """
    if method != "GET":
        return 400, f"Bad WebSocket handshake: the method must be GET, got {method}"
    if version == "HTTP/1.0":
        return 400, "Bad WebSocket handshake: the request must be HTTP/1.1, got HTTP/1.0"
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        return 400, 'Bad WebSocket handshake: the "Upgrade" header must be "websocket"'
    tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    if "upgrade" not in tokens:
        return 400, 'Bad WebSocket handshake: the "Connection" header must include "Upgrade"'
    key = headers.get("Sec-WebSocket-Key", "").strip()
    if not key:
        return 400, "Bad WebSocket handshake: missing Sec-WebSocket-Key"
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return 400, "Bad WebSocket handshake: Sec-WebSocket-Key must be 16 bytes in base64"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return 426, "Bad WebSocket handshake: Sec-WebSocket-Version must be 13"
    return None


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode("ascii")
