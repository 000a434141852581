"""The attachment codec: JSON, strictly, so decoding never executes code.

What ``serialize_attachment`` accepts: ``None``, ``bool``, ``int``, finite
``float``, ``str``, and ``list``/``tuple``/``dict`` of these (dict keys must be
``str``). Tuples come back as lists. The value is encoded at once, so the
stored attachment is a copy: changing the original later does not change it.
The limit applies to the UTF-8 length of the compact JSON text.
"""

from __future__ import annotations

import json
import math
from typing import Any

from wsecho.api.codec import utf8
from wsecho.core.errors import InvalidArgumentError

_SCALARS = (str, int, bool, type(None))


def _check(value: Any, path: str, depth: int) -> None:
    if depth > 100:
        msg = f"serialize_attachment(): nested deeper than 100 levels at {path}"
        raise InvalidArgumentError(msg)
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            msg = f"serialize_attachment(): {value!r} at {path} is not JSON (only finite numbers are)"
            raise InvalidArgumentError(msg)
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                msg = f"serialize_attachment(): dict keys must be str, got {key!r} at {path}"
                raise InvalidArgumentError(msg)
            _check(item, f"{path}[{key!r}]", depth + 1)
        return
    msg = (
        f"serialize_attachment(): {type(value).__name__} at {path} is not JSON-compatible "
        "(use None, bool, int, float, str, list, tuple or dict with str keys)"
    )
    raise InvalidArgumentError(msg)


def encode(value: Any, limit: int) -> str:
    """The compact JSON text of ``value``; raises if it is not JSON-compatible or too big."""
    _check(value, "the top level", 0)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    size = len(utf8(text, "serialize_attachment(): the value"))
    if size > limit:
        msg = f"serialize_attachment(): the value is {size} bytes encoded; the limit is {limit}"
        raise InvalidArgumentError(msg)
    return text


def decode(text: str) -> Any:
    return json.loads(text)
