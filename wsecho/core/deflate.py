"""permessage-deflate (RFC 7692), sans-IO: the negotiation, and one message in or out.

The server always answers with ``server_no_context_takeover`` and ``client_no_context_takeover``
(RFC 7692 §7.1.1: a server MAY include ``client_no_context_takeover`` even if the client did not
offer it), so every message is compressed and inflated on its own: no zlib stream lives between
messages, and a hibernated compressed socket holds no zlib state (zlib's default contexts cost
about 256 KiB to deflate and 40 KiB to inflate; a plain idle socket costs about 2 KiB).

Each message gets a fresh zlib object, sized for it: a message of ``n`` bytes cannot refer back
further than ``n`` bytes, so the window is the smallest power of two above ``n`` (at least 2**9,
zlib's smallest raw window; at most what the client allows) and the hash table shrinks with it.
Measured for a 4 KiB JSON message (Python 3.11, zlib 1.2.13): ``compressobj()`` with zlib's
defaults (window 2**15, memLevel 8) 52 µs; window 2**13 and memLevel 5, 20 µs, the same 800
bytes out; a ``copy()`` of a pristine compressor 73 µs (it copies the 256 KiB of state);
``zlib.compress(wbits=-15)`` in one shot 54 µs. Inflating: 7 µs. A message of 16 to 300 bytes
costs under 3 µs (its window is the smallest), so every message goes out compressed, as
Tornado and websockets do: RFC 7692 §6 would allow plain ones, but kosoku, which runs
Autobahn's 12.* and 13.*, fails every echo that comes back uncompressed.
"""

from __future__ import annotations

import zlib

#: The extension's token in ``Sec-WebSocket-Extensions``.
PERMESSAGE_DEFLATE = "permessage-deflate"
#: zlib's compression level (Tornado's and zlib's default: the same bytes out as their clients').
LEVEL = 6
#: What RFC 7692 §7.2.2 has the receiver append to a message before inflating it.
_TAIL = b"\x00\x00\xff\xff"
_WINDOWS = frozenset(str(bits) for bits in range(8, 16))
_PARAMS = frozenset(
    {"server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits", "client_max_window_bits"}
)


def _window_bits(value: str | None) -> int | None:
    """A window size parameter's value (8 to 15, no leading zero, RFC 7692 §7.1.2), or None."""
    if value is None or value not in _WINDOWS:
        return None
    return int(value)


def _offers(header: str) -> list[list[tuple[str, str | None]]]:
    """The ``permessage-deflate`` offers in a ``Sec-WebSocket-Extensions`` value, in order."""
    offers = []
    for item in header.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if name.lower() != PERMESSAGE_DEFLATE:
            continue
        parsed: list[tuple[str, str | None]] = []
        for param in params:
            key, eq, value = param.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':  # a quoted-string (RFC 7692 §5)
                value = value[1:-1]
            parsed.append((key.strip().lower(), value if eq else None))
        offers.append(parsed)
    return offers


def _accept(params: list[tuple[str, str | None]]) -> tuple[str, int] | None:
    """The response to one offer and the server's window bits, or None to decline it (an offer
    the server cannot satisfy is declined, never a reason to fail the handshake)."""
    seen: set[str] = set()
    window: int | None = 15
    for key, value in params:
        if key not in _PARAMS or key in seen:
            return None  # unknown or repeated parameters make the offer invalid (§7.1)
        seen.add(key)
        if key == "server_max_window_bits":
            window = _window_bits(value)
        elif key == "client_max_window_bits":
            # Only a hint to us (we inflate with any window up to 2**15); its value, if any,
            # must still be valid.
            if value is not None and _window_bits(value) is None:
                return None
        elif value is not None:
            return None  # the no_context_takeover parameters take no value
    if window is None:
        return None
    response = f"{PERMESSAGE_DEFLATE}; server_no_context_takeover; client_no_context_takeover"
    if "server_max_window_bits" in seen:
        response += f"; server_max_window_bits={window}"
    return response, window


def negotiate(header: str) -> tuple[str, int] | None:
    """The ``Sec-WebSocket-Extensions`` response to the client's offers, and the window bits the
    server may compress with; None when no offer is acceptable (the handshake goes on without)."""
    for params in _offers(header):
        accepted = _accept(params)
        if accepted is not None:
            return accepted
    return None


def compress(data: bytes, window_bits: int) -> bytes:
    """One message's payload, deflated on its own (RFC 7692 §7.2.1), with a window of at most
    ``2**window_bits`` bytes."""
    if window_bits == 8:
        # zlib cannot deflate raw with a 256-byte window; Huffman coding alone refers back to
        # nothing, so it suits any window the client asked for.
        compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -9, 8, zlib.Z_HUFFMAN_ONLY)
    else:
        bits = min(window_bits, max(9, len(data).bit_length()))
        compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -bits, max(2, bits - 8))
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflate(data: bytes, limit: int) -> bytes | None:
    """One message inflated (RFC 7692 §7.2.2), or None when it inflates past ``limit`` bytes: zlib
    stops at ``limit + 1`` bytes out, so a small message that inflates to gigabytes (a zip bomb)
    costs no more than ``limit``. Raises ``zlib.error`` for data that is not deflate."""
    out = zlib.decompressobj(-15).decompress(data + _TAIL, limit + 1)
    return None if len(out) > limit else out
