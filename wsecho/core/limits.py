"""The per-object and per-socket limits of SPEC §4, with Cloudflare's defaults.

These defaults are the only copy: the server's ``--max-*`` options take theirs from here.
"""

from __future__ import annotations

from typing import Any

import attrs

from wsecho.core.fanout import MIN_QUEUE_BYTES


def _positive(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = f"Limits.{attribute.name} must be a positive integer, got {value!r}"
        raise ValueError(msg)


def _positive_or_none(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive(instance, attribute, value)


def _fanout_queue(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < MIN_QUEUE_BYTES:
        msg = f"Limits.{attribute.name} must be an integer of at least {MIN_QUEUE_BYTES}, got {value!r}"
        raise ValueError(msg)


@attrs.frozen
class Limits:
    """``Runtime(limits=Limits(...))``; every error message quotes the limit it hit."""

    #: Hibernatable sockets one object may hold.
    sockets_per_object: int = attrs.field(default=32_768, validator=_positive)
    #: Distinct tags per socket, and the UTF-8 length of each.
    tags_per_socket: int = attrs.field(default=10, validator=_positive)
    tag_bytes: int = attrs.field(default=256, validator=_positive)
    #: Encoded size of a socket's attachment.
    attachment_bytes: int = attrs.field(default=16_384, validator=_positive)
    #: UTF-8 length of the auto-response request and of its response.
    auto_response_bytes: int = attrs.field(default=2_048, validator=_positive)
    #: Request/response pairs one object may set (wsecho's; Cloudflare allows one).
    auto_responses: int = attrs.field(default=16, validator=_positive)
    #: The largest hibernatable-socket event timeout an object may set (7 days).
    event_timeout_ms: int = attrs.field(default=604_800_000, validator=_positive)
    #: Bytes one object may store (keys in UTF-8 plus encoded values); None: no quota.
    object_storage_bytes: int | None = attrs.field(default=128 * 1024 * 1024, validator=_positive_or_none)
    #: Bytes all objects together may store; None: no quota.
    storage_bytes: int | None = attrs.field(default=4 * 1024 * 1024 * 1024, validator=_positive_or_none)
    #: Bytes queued for one socket past which ``ctx.broadcast`` applies its class's
    #: ``fanout_overflow`` to it, unless the class sets ``fanout_queue_bytes`` (far below the
    #: 16 MiB at which any send cuts a slow peer).
    fanout_queue_bytes: int = attrs.field(default=1024 * 1024, validator=_fanout_queue)
    #: Outbound WebSockets (``ctx.connect_web_socket``) one object may hold, and the process.
    outbound_per_object: int = attrs.field(default=16, validator=_positive)
    outbound_sockets: int = attrs.field(default=1024, validator=_positive)
