"""RFC 6455 framing, sans-IO: bytes in, events out; events in, bytes out.

:class:`FrameParser` turns what a client sends into events, validating every rule a
server must enforce (RFC 6455 §5 and §7), so that the connection code only moves bytes:

- ``(TEXT, str)``, ``(BINARY, bytes)`` — a whole message, reassembled from its fragments;
- ``(PING, bytes)``, ``(PONG, bytes)``;
- ``(CLOSE, (code | None, reason))`` — a valid Close (code None when it had no payload);
  nothing after it is parsed: RFC 6455 §5.5.1 allows no frame after a Close;
- ``(FAIL, (code, reason))`` — the connection must be failed with this close code
  (1002 protocol error, 1007 invalid UTF-8, 1009 message too big or in too many fragments).
  Nothing is parsed after it.

Text is validated incrementally, as its bytes arrive (even within a frame that is not
complete yet), so invalid UTF-8 fails the connection at the first bad byte ("fail fast"),
not when the message or the frame ends. Frames are built by :func:`frame`.

The work of one call is bounded: with ``pass_bytes``, :meth:`FrameParser.feed` stops starting
frames once that many bytes were consumed since the last :meth:`FrameParser.resume` and sets
``held``; the caller lets other connections run, then calls ``resume()`` for the rest. A flood
of tiny frames (a 1 MiB message as a million one-byte fragments is 7 MB on the wire) then
costs other clients one bounded slice at a time instead of the whole flood.

With permessage-deflate negotiated (``deflate=True``, RFC 7692), RSV1 on the first frame of a
data message says that the message is compressed: its frames are collected (their wire size
bounded like a message's) and inflated as one when it ends, bounded by ``max_message_size`` on
the inflated size (1009 past it), then text is checked as UTF-8. Control frames and
continuation frames never carry RSV1 (1002).
"""

from __future__ import annotations

import codecs
import struct
import sys
import zlib
from collections.abc import Callable
from typing import Any

from wsecho.core import deflate as _deflate

TEXT, BINARY, PING, PONG, CLOSE, FAIL = "text", "binary", "ping", "pong", "close", "fail"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_utf8_decoder = codecs.getincrementaldecoder("utf-8")

#: Frames one message may arrive in; the next continuation frame fails the connection with 1009.
#: Each fragment costs a parse, an unmask and a list entry (about 40 bytes and 0.8 µs for a
#: one-byte fragment), so without a cap a 1 MiB message in one-byte fragments costs 0.8 s of
#: CPU and 40 MB of memory. The real Autobahn wstest sends 4 MiB in 64-byte fragments (9.3.1,
#: 9.4.1) as 2**16 full frames plus an empty final one, 65,537 frames, so the cap is twice that
#: with room to spare: 2**17. Browsers never fragment what they send; libraries that stream cut
#: messages into KiB-sized fragments, far fewer than this.
MAX_FRAGMENTS = 131_072


def unmask(mask: bytes, data: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask``, with big-int arithmetic.

    The server passes a faster routine to :class:`FrameParser` (Tornado's C one); this one
    needs nothing outside the standard library."""
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 §7.4.1 and the IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameParser:
    """Parses client-to-server frames (which must be masked) up to ``max_message_size`` per message,
    in at most ``max_fragments`` frames, consuming at most ``pass_bytes`` per pass (None: no bound)."""

    __slots__ = (
        "_budget",
        "_buf",
        "_checked",
        "_compressed",
        "_decoder",
        "_failed",
        "_frag_count",
        "_frag_op",
        "_frag_size",
        "_frags",
        "_need",
        "_partial_mask",
        "_partial_text",
        "_parts",
        "_parts_size",
        "_unmask",
        "deflate",
        "held",
        "max_fragments",
        "max_message_size",
        "pass_bytes",
    )

    def __init__(
        self,
        max_message_size: int,
        *,
        max_fragments: int = MAX_FRAGMENTS,
        pass_bytes: int | None = None,
        unmask: Callable[[bytes, bytes], bytes] = unmask,
        deflate: bool = False,
    ) -> None:
        self.max_message_size = max_message_size
        #: Whether permessage-deflate was negotiated: RSV1 then marks a compressed message.
        self.deflate = deflate
        #: Whether the fragmented message in progress is compressed.
        self._compressed = False
        #: ``unmask(mask, data)``: the server passes a C routine (Tornado's) when there is one.
        self._unmask = unmask
        self.max_fragments = max_fragments
        self.pass_bytes = pass_bytes if pass_bytes is not None else sys.maxsize
        #: Bytes this pass may still consume (see :meth:`resume`).
        self._budget = self.pass_bytes
        #: Whether the last call stopped because the pass's budget ran out: call resume() next.
        self.held = False
        self._frag_count = 0
        self._buf = b""
        #: A frame larger than what has arrived: its bytes so far (joined once, when it is
        #: complete, instead of being copied again by every read), and how many it needs.
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._need = 0
        #: That frame's mask, and whether its payload is text to check as it arrives.
        self._partial_mask = b""
        self._partial_text = False
        self._frag_op = -1  # opcode of the fragmented message in progress, -1 for none
        self._frags: list[bytes] = []
        self._frag_size = 0
        self._decoder: Any = None
        #: Payload bytes of the frame in progress whose UTF-8 was already checked.
        self._checked = 0
        self._failed = False

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        """The complete events in ``data`` (plus what earlier calls left unparsed), up to the budget."""
        if self._failed:
            return []
        if self._need:
            if data:
                if self._partial_text:
                    # Check the new bytes of this frame's payload now (not those of the frames
                    # behind it): invalid text fails the connection at the bad byte.
                    fail = self._check_partial(self._partial_mask, data[: self._need - self._parts_size])
                    if fail is not None:
                        return self._fail([], *fail)
                self._parts.append(data)
                self._parts_size += len(data)
            if self._parts_size < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts, self._parts_size, self._need = [], 0, 0
        else:
            buf = self._buf + data if self._buf else data
        events: list[tuple[str, Any]] = []
        pos = 0
        end = len(buf)
        # Where this pass's budget ends: no frame starts at or past it (the one that crosses it
        # is finished, so a frame larger than the budget still goes through, alone).
        limit = self._budget
        unmask = self._unmask
        while end - pos >= 2:
            if pos >= limit:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            opcode = b0 & 0x0F
            # The common frame: final, masked, no reserved bits, text or binary, no message
            # in progress, within the limit. Anything else takes the full check.
            common = (
                (b0 & 0xF0) == 0x80
                and b1 & 0x80
                and (opcode == 1 or opcode == 2)
                and self._frag_op < 0
                and length <= self.max_message_size
            )
            if not common:
                fail = self._check_header(b0, b1, opcode, length)
                if fail is not None:
                    return self._fail(events, *fail)
            start = pos + head + 4
            stop = start + length
            if stop > end:
                text = self._text_frame(b0, opcode)
                if end > start + self._checked and text:
                    # Part of a text frame is here: check its UTF-8 now, so that invalid text
                    # fails the connection at the bad byte, not when the frame completes.
                    fail = self._check_partial(buf[pos + head : start], buf[start + self._checked : end])
                    if fail is not None:
                        return self._fail(events, *fail)
                if end >= start and pos < limit:
                    # The frame's header and mask are here, its payload not yet: keep what
                    # came, and join it once when the frame is complete.
                    self._parts, self._parts_size, self._need = [buf[pos:]], end - pos, stop - pos
                    self._partial_mask, self._partial_text = buf[pos + head : start], text
                    self._buf = b""
                    self._budget = limit - pos
                    self.held = False
                    return events
                break
            payload = unmask(buf[pos + head : start], buf[start:stop]) if length else b""
            pos = stop
            if common and not self._checked:
                # a whole message in one frame, nothing of it checked yet: the usual case
                if opcode == OP_BINARY:
                    events.append((BINARY, payload))
                    continue
                try:
                    events.append((TEXT, payload.decode("utf-8")))
                    continue
                except UnicodeDecodeError:
                    return self._fail(events, 1007, "invalid UTF-8 in a text message")
            if not self._frame(b0, opcode, payload, events):
                return events
        self._buf = buf[pos:] if pos < end else b""
        self._budget = limit - pos
        self.held = pos >= limit
        return events

    def resume(self) -> list[tuple[str, Any]]:
        """Start a new pass: the events of what earlier calls left unparsed, up to a new budget."""
        self._budget = self.pass_bytes
        self.held = False
        return self.feed(b"")

    def _text_frame(self, b0: int, opcode: int) -> bool:
        """Whether this frame is plain text (compressed text is checked once it is inflated)."""
        if opcode == OP_TEXT:
            return not b0 & 0x40
        return opcode == OP_CONT and self._frag_op == OP_TEXT and not self._compressed

    def _check_partial(self, mask: bytes, chunk: bytes) -> tuple[int, str] | None:
        """Validate the next ``chunk`` of the frame in progress (``_checked`` bytes already were)."""
        if self._decoder is None:
            self._decoder = _utf8_decoder()  # the first frame of a text message
        shift = self._checked % 4
        try:
            self._decoder.decode(self._unmask(mask[shift:] + mask[:shift], chunk), False)
        except UnicodeDecodeError:
            return 1007, "invalid UTF-8 in a text message"
        self._checked += len(chunk)
        return None

    def _check_header(self, b0: int, b1: int, opcode: int, length: int) -> tuple[int, str] | None:
        compressed = bool(b0 & 0x40)
        if b0 & 0x70 and (b0 & 0x70 != 0x40 or not self.deflate):
            return 1002, "reserved bits set without a negotiated extension"
        if compressed and opcode not in (OP_TEXT, OP_BINARY):
            # RFC 7692 §6: only the first frame of a data message carries "Per-Message Compressed"
            return 1002, f"RSV1 set on a frame with opcode {opcode:#x}"
        if not b1 & 0x80:
            return 1002, "client frames must be masked"
        if opcode & 0x08:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                return 1002, f"unknown control opcode {opcode:#x}"
            if not b0 & 0x80:
                return 1002, "control frames must not be fragmented"
            if length > 125:
                return 1002, "control frame payloads are at most 125 bytes"
            return None
        if opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
            return 1002, f"unknown data opcode {opcode:#x}"
        if opcode == OP_CONT:
            if self._frag_op < 0:
                return 1002, "a continuation frame with no message to continue"
            if self._frag_count >= self.max_fragments:
                return 1009, f"message in more than {self.max_fragments} fragments"
            total = self._frag_size + length
            compressed = self._compressed
        else:
            if self._frag_op >= 0:
                return 1002, "a new message started before the fragmented one ended"
            total = length
        # Deflate can grow incompressible data a little (5 bytes per 16 KiB stored block): a
        # message of max_message_size bytes is accepted compressed too.
        limit = self.max_message_size
        if compressed:
            limit += (limit >> 10) + 64
        if total > limit:
            return 1009, f"message of more than {self.max_message_size} bytes"
        return None

    def _frame(self, b0: int, opcode: int, payload: bytes, events: list[tuple[str, Any]]) -> bool:
        """Handle one complete frame; False once nothing more is to be parsed (a failure or a Close)."""
        fin = b0 & 0x80
        if opcode == OP_PING:
            events.append((PING, payload))
            return True
        if opcode == OP_PONG:
            events.append((PONG, payload))
            return True
        if opcode == OP_CLOSE:
            return self._close(payload, events)
        checked, self._checked = self._checked, 0
        if opcode != OP_CONT:  # the first frame of a message
            if fin:
                self._decoder = None  # used only while the frame was arriving
                if b0 & 0x40:
                    return self._inflated(opcode, payload, events)
                if opcode == OP_TEXT:
                    try:
                        events.append((TEXT, payload.decode("utf-8")))
                    except UnicodeDecodeError:
                        self._fail(events, 1007, "invalid UTF-8 in a text message")
                        return False
                else:
                    events.append((BINARY, payload))
                return True
            self._frag_op = opcode
            self._frags = []
            self._frag_size = 0
            self._frag_count = 0
            self._compressed = bool(b0 & 0x40)
            if opcode == OP_TEXT and not checked and not self._compressed:
                self._decoder = _utf8_decoder()
        self._frags.append(payload)
        self._frag_size += len(payload)
        self._frag_count += 1
        if self._decoder is not None:
            try:  # validated as it arrives: invalid UTF-8 fails at its first fragment
                self._decoder.decode(payload[checked:], bool(fin))
            except UnicodeDecodeError:
                self._fail(events, 1007, "invalid UTF-8 in a text message")
                return False
        if fin:
            whole = b"".join(self._frags)
            op, self._frag_op = self._frag_op, -1
            self._frags = []
            self._frag_size = 0
            self._decoder = None
            if self._compressed:
                self._compressed = False
                return self._inflated(op, whole, events)
            if op == OP_TEXT:
                events.append((TEXT, whole.decode("utf-8")))
            else:
                events.append((BINARY, whole))
        return True

    def _inflated(self, opcode: int, data: bytes, events: list[tuple[str, Any]]) -> bool:
        """A whole compressed message: inflated within the limit, then delivered like any."""
        try:
            payload = _deflate.inflate(data, self.max_message_size)
        except zlib.error as exc:
            self._fail(events, 1007, f"a compressed message that does not inflate ({exc})")
            return False
        if payload is None:
            self._fail(events, 1009, f"message inflates to more than {self.max_message_size} bytes")
            return False
        if opcode == OP_BINARY:
            events.append((BINARY, payload))
            return True
        try:
            events.append((TEXT, payload.decode("utf-8")))
        except UnicodeDecodeError:
            self._fail(events, 1007, "invalid UTF-8 in a text message")
            return False
        return True

    def _close(self, payload: bytes, events: list[tuple[str, Any]]) -> bool:
        if not payload:
            events.append((CLOSE, (None, "")))
            self._failed = True  # nothing after a Close is parsed (RFC 6455 §5.5.1)
            return False
        if len(payload) == 1:
            self._fail(events, 1002, "a Close payload of one byte")
            return False
        code = (payload[0] << 8) | payload[1]
        if not valid_close_code(code):
            self._fail(events, 1002, f"invalid close code {code}")
            return False
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(events, 1007, "invalid UTF-8 in the Close reason")
            return False
        events.append((CLOSE, (code, reason)))
        self._failed = True  # nothing after a Close is parsed (RFC 6455 §5.5.1)
        return False

    def _fail(self, events: list[tuple[str, Any]], code: int, reason: str) -> list[tuple[str, Any]]:
        events.append((FAIL, (code, reason)))
        self._failed = True
        self._buf = b""
        self._frags = []
        self._parts, self._parts_size, self._need = [], 0, 0
        return events


_HEAD_SMALL = struct.Struct("!BB")
_HEAD_MEDIUM = struct.Struct("!BBH")
_HEAD_LARGE = struct.Struct("!BBQ")


def frame(opcode: int, payload: bytes) -> bytes:
    """A single unmasked, final server frame."""
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        return _HEAD_SMALL.pack(b0, n) + payload
    if n < 65536:
        return _HEAD_MEDIUM.pack(b0, 126, n) + payload
    return _HEAD_LARGE.pack(b0, 127, n) + payload


def message_frame(message: str | bytes) -> bytes:
    """The server frame of one whole message: text for ``str``, binary for bytes.

    The small message's header is built inline: this is the hot path of every echo."""
    if isinstance(message, str):  # exact str in practice; isinstance narrows the type
        data = message.encode("utf-8")
        n = len(data)
        return bytes((0x81, n)) + data if n < 126 else frame(OP_TEXT, data)
    n = len(message)
    return bytes((0x82, n)) + message if n < 126 else frame(OP_BINARY, message)


def deflated_frame(message: str | bytes, window_bits: int) -> bytes:
    """The server frame of one whole message compressed on its own (permessage-deflate, RFC 7692),
    with a window of at most ``2**window_bits`` bytes."""
    if isinstance(message, str):
        data, opcode = message.encode("utf-8"), OP_TEXT
    else:
        data, opcode = message, OP_BINARY
    # 0x40 in the first byte: RSV1, "Per-Message Compressed" (RFC 7692 §6)
    return frame(opcode | 0x40, _deflate.compress(data, window_bits))


def close_payload(code: int | None, reason: str) -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode("utf-8")
