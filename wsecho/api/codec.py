"""The storage value codec: JSON-compatible values plus ``bytes``; decoding never executes code.

A stored value is one tag byte and a payload:

- ``b"b"`` + the raw bytes, for a top-level ``bytes`` value (no base64 cost);
- ``b"j"`` + UTF-8 JSON, for everything else.

Inside JSON, ``bytes`` nested in lists or dicts become ``{"$b": "<base64>"}``, and a
dict of the user's that has any key starting with ``$`` is wrapped as
``{"$d": {...}}`` so that it can never be mistaken for one of those. Accepted:
``None``, ``bool``, ``int``, finite ``float``, ``str``, ``bytes``/``bytearray``,
and ``list``/``tuple``/``dict`` (``str`` keys) of those. Tuples come back as
lists, bytearrays as bytes.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from wsecho.core.errors import InvalidArgumentError

MAX_DEPTH = 100


def _to_json(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        msg = f"storage values may nest at most {MAX_DEPTH} levels deep"
        raise InvalidArgumentError(msg)
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            msg = f"storage values must be finite numbers, got {value!r}"
            raise InvalidArgumentError(msg)
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list | tuple):
        return [_to_json(v, depth + 1) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        escaped = False
        for key, item in value.items():
            if not isinstance(key, str):
                msg = f"storage dict keys must be str, got {key!r}"
                raise InvalidArgumentError(msg)
            escaped = escaped or key.startswith("$")
            out[key] = _to_json(item, depth + 1)
        return {"$d": out} if escaped else out
    msg = (
        f"cannot store a {type(value).__name__}: storage takes None, bool, int, float, str, bytes, "
        "and lists, tuples and dicts (str keys) of those"
    )
    raise InvalidArgumentError(msg)


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            if "$b" in value:
                return base64.b64decode(value["$b"])
            if "$d" in value:
                return {k: _from_json(v) for k, v in value["$d"].items()}
        return {k: _from_json(v) for k, v in value.items()}
    return value


def encode(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return b"b" + bytes(value)
    text = json.dumps(_to_json(value, 0), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"j" + utf8(text, "a stored string")


def utf8(text: str, what: str) -> bytes:
    """``text`` in UTF-8; a lone surrogate (which UTF-8 cannot encode) is an InvalidArgumentError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        msg = f"{what} contains a lone surrogate ({bad} at index {exc.start}), which UTF-8 cannot encode"
        raise InvalidArgumentError(msg) from None


def decode(data: bytes) -> Any:
    tag, payload = data[:1], data[1:]
    if tag == b"b":
        return payload
    if tag == b"j":
        return _from_json(json.loads(payload))
    msg = f"unknown stored value tag {tag!r}"
    raise ValueError(msg)
