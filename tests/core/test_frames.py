"""The sans-IO frame parser: every rule of RFC 6455 a server enforces, and fuzzing."""

import os
import random
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsecho.core import deflate
from wsecho.core.frames import (
    BINARY,
    CLOSE,
    FAIL,
    MAX_FRAGMENTS,
    OP_PING,
    PING,
    PONG,
    TEXT,
    FrameParser,
    close_payload,
    frame,
    message_frame,
    unmask,
    valid_close_code,
)


def client_frame(opcode, payload=b"", fin=True, masked=True, rsv=0, length=None):
    """A client frame, with every field controllable (so it can be wrong)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + unmask(mask, payload)


def parse(*frames, limit=1 << 20):
    return FrameParser(limit).feed(b"".join(frames))


def test_whole_messages():
    assert parse(client_frame(1, "héllo".encode()), client_frame(2, b"\x00\xff")) == [
        (TEXT, "héllo"),
        (BINARY, b"\x00\xff"),
    ]


def test_fragments_are_reassembled_with_control_frames_between():
    events = parse(
        client_frame(1, b"he", fin=False),
        client_frame(9, b"ping!"),
        client_frame(0, b"ll", fin=False),
        client_frame(0, b"o"),
    )
    assert events == [(PING, b"ping!"), (TEXT, "hello")]


def test_byte_by_byte_delivery_gives_the_same_events():
    data = client_frame(2, b"x" * 300) + client_frame(10, b"p") + client_frame(8, struct.pack("!H", 1000) + b"bye")
    parser = FrameParser(1 << 20)
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    assert events == [(BINARY, b"x" * 300), (PONG, b"p"), (CLOSE, (1000, "bye"))]


def test_lengths_of_16_and_64_bits():
    assert parse(client_frame(2, b"a" * 70_000), limit=1 << 20) == [(BINARY, b"a" * 70_000)]
    assert parse(client_frame(2, b"b" * 126)) == [(BINARY, b"b" * 126)]


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (client_frame(1, b"x", masked=False), 1002, "client frames must be masked"),
        (client_frame(1, b"x", rsv=0x40), 1002, "reserved bits"),
        (client_frame(3, b"x"), 1002, "unknown data opcode 0x3"),
        (client_frame(11, b"x"), 1002, "unknown control opcode 0xb"),
        (client_frame(9, b"x", fin=False), 1002, "control frames must not be fragmented"),
        (client_frame(9, b"x" * 126), 1002, "control frame payloads are at most 125 bytes"),
        (client_frame(0, b"x"), 1002, "a continuation frame with no message to continue"),
        (client_frame(1, b"a", fin=False) + client_frame(2, b"b"), 1002, "a new message started"),
        (client_frame(1, b"\xff"), 1007, "invalid UTF-8"),
        (client_frame(8, b"\x03"), 1002, "a Close payload of one byte"),
        (client_frame(8, struct.pack("!H", 1005)), 1002, "invalid close code 1005"),
        (client_frame(8, struct.pack("!H", 1000) + b"\xff"), 1007, "invalid UTF-8 in the Close reason"),
        (client_frame(2, b"x" * 11), 1009, "message of more than 10 bytes"),
        (client_frame(2, b"x" * 6, fin=False) + client_frame(0, b"y" * 6), 1009, "message of more than 10 bytes"),
    ],
    ids=[
        "unmasked",
        "rsv",
        "data-opcode",
        "control-opcode",
        "fragmented-control",
        "long-control",
        "lone-continuation",
        "interleaved-message",
        "bad-utf8",
        "one-byte-close",
        "bad-close-code",
        "bad-close-reason",
        "too-big",
        "too-big-fragmented",
    ],
)
def test_violations_fail_the_connection(data, code, reason):
    parser = FrameParser(10)
    events = parser.feed(data + client_frame(1, b"after"))
    assert events[-1][0] == FAIL
    assert events[-1][1][0] == code
    assert reason in events[-1][1][1]
    assert parser.feed(client_frame(1, b"more")) == []  # nothing after a failure


def test_too_big_fails_on_the_header_before_the_payload_arrives():
    header_only = client_frame(2, b"", length=1 << 30)[:10]
    assert parse(header_only, limit=1024)[0][0] == FAIL
    # as soon as each length form is complete: 2 + 2 bytes for 16 bits (not before: 9 of 10)
    assert parse(client_frame(2, b"", length=2000)[:4], limit=1024)[0][0] == FAIL
    assert parse(header_only[:9], limit=1024) == []


def test_invalid_utf8_fails_at_the_first_bad_fragment():
    # "fail fast" (Autobahn 6.4.x): no need to wait for the end of the message
    events = parse(
        client_frame(1, "κόσμε".encode(), fin=False),
        client_frame(0, b"\xf4\x90\x80\x80", fin=False),
        client_frame(0, b"more"),
    )
    assert events == [(FAIL, (1007, "invalid UTF-8 in a text message"))]


def test_a_text_frame_that_ends_inside_a_code_point_fails_when_it_is_complete():
    # Checked in pieces as it arrives, the text is valid until its last byte; nothing after
    # the failure is parsed.
    parser = FrameParser(1000)
    text = client_frame(1, b"ok" * 20 + "€".encode()[:2])
    assert parser.feed(text[:10]) == []
    assert parser.feed(text[10:] + client_frame(9, b"p")) == [(FAIL, (1007, "invalid UTF-8 in a text message"))]


def test_a_control_frame_may_carry_125_bytes():
    assert parse(client_frame(9, b"p" * 125)) == [(PING, b"p" * 125)]


def test_a_read_that_completes_a_frame_and_starts_the_next_one_loses_nothing():
    big, small = client_frame(2, b"x" * 100), client_frame(2, b"y")
    parser = FrameParser(1000)
    assert parser.feed(big[:50]) == []
    assert parser.feed(big[50:] + small[:1]) == [(BINARY, b"x" * 100)]
    assert parser.feed(small[1:]) == [(BINARY, b"y")]


def test_a_code_point_split_across_fragments_is_fine():
    data = "€".encode()
    assert parse(client_frame(1, data[:1], fin=False), client_frame(0, data[1:])) == [(TEXT, "€")]


def test_close_without_payload():
    assert parse(client_frame(8)) == [(CLOSE, (None, ""))]


def test_server_frames():
    assert frame(1, b"hi") == b"\x81\x02hi"
    assert frame(2, b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"
    assert frame(2, b"x" * 70_000)[:2] == b"\x82\x7f"


@pytest.mark.parametrize(
    ("size", "head"),
    [
        (0, b"\x00"),
        (125, b"\x7d"),
        (126, b"\x7e\x00\x7e"),
        (65535, b"\x7e\xff\xff"),
        (65536, b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_server_message_frames_use_the_shortest_length_at_each_boundary(size, head):
    # RFC 6455 §5.2: 7 bits up to 125, then 16, then 64; a text message of str, binary of bytes.
    assert (
        message_frame("é" * (size // 2) + "x" * (size % 2))
        == bytes([0x81]) + head + ("é" * (size // 2) + "x" * (size % 2)).encode()
    )
    assert message_frame(b"b" * size) == bytes([0x82]) + head + b"b" * size
    assert frame(OP_PING, b"p" * size) == bytes([0x89]) + head + b"p" * size


def test_a_close_payload_is_the_code_then_the_utf8_reason_or_nothing():
    assert close_payload(None, "") == b""
    assert close_payload(1000, "") == b"\x03\xe8"
    assert close_payload(4999, "bye ✓") == b"\x13\x87" + "bye ✓".encode()
    assert parse(client_frame(8, close_payload(3000, "é"))) == [(CLOSE, (3000, "é"))]


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_fuzz_any_bytes_never_crash_the_parser(data):
    parser = FrameParser(1000)
    for chunk in (data[:7], data[7:100], data[100:]):
        for kind, _ in parser.feed(chunk):
            assert kind in (TEXT, BINARY, PING, PONG, CLOSE, FAIL)


@given(
    st.lists(
        st.one_of(st.text(max_size=300).map(lambda t: (1, t.encode())), st.binary(max_size=300).map(lambda b: (2, b))),
        max_size=8,
    ),
    st.integers(min_value=1, max_value=64),
)
@settings(max_examples=200, deadline=None)
def test_fuzz_messages_survive_any_fragmentation_and_chunking(messages, chunk):
    wire = b""
    for opcode, payload in messages:
        pieces = [payload[i : i + 50] for i in range(0, len(payload), 50)] or [b""]
        for i, piece in enumerate(pieces):
            wire += client_frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1)
    parser = FrameParser(1 << 20)
    events = []
    for i in range(0, len(wire), chunk):
        events += parser.feed(wire[i : i + chunk])
    expected = [(TEXT, p.decode()) if op == 1 else (BINARY, p) for op, p in messages]
    assert events == expected


def test_nothing_after_a_close_is_parsed():
    # Autobahn 7.1.2/7.1.3: a second Close or a ping after the Close gets no answer
    close = client_frame(8, struct.pack("!H", 1000))
    parser = FrameParser(1000)
    assert parser.feed(close + client_frame(9, b"p") + close) == [(CLOSE, (1000, ""))]
    assert parser.feed(client_frame(1, b"late")) == []


def test_nothing_after_a_close_without_a_payload_is_parsed_either():
    parser = FrameParser(1000)
    assert parser.feed(client_frame(8) + client_frame(9, b"p")) == [(CLOSE, (None, ""))]
    assert parser.feed(client_frame(1, b"late")) == []


def test_each_fragmented_message_starts_afresh():
    # The fragment count, the size and the UTF-8 check belong to one message: a second
    # fragmented message (binary, not UTF-8, after a text one) is held to the limits alone.
    parser = FrameParser(1000, max_fragments=3)
    text = client_frame(1, b"t" * 200, fin=False) + client_frame(0, b"t" * 200, fin=False) + client_frame(0, b"t" * 200)
    binary = client_frame(2, b"\xff" * 200, fin=False) + client_frame(0, b"\xfe" * 200, fin=False)
    events = parser.feed(text + binary + client_frame(0, b"\xfd" * 200))
    assert events == [(TEXT, "t" * 600), (BINARY, b"\xff" * 200 + b"\xfe" * 200 + b"\xfd" * 200)]


def test_a_fragmented_message_of_exactly_the_limit_passes_every_time_and_one_byte_more_fails():
    parser = FrameParser(10)
    exactly = client_frame(2, b"x" * 5, fin=False) + client_frame(0, b"y" * 5)
    assert parser.feed(exactly + exactly) == [(BINARY, b"x" * 5 + b"y" * 5)] * 2
    over = client_frame(2, b"x" * 5, fin=False) + client_frame(0, b"y" * 6)
    assert parser.feed(over) == [(FAIL, (1009, "message of more than 10 bytes"))]
    assert FrameParser(10).feed(over) == [(FAIL, (1009, "message of more than 10 bytes"))]


def test_an_unmasked_empty_frame_fails_at_once():
    assert FrameParser(10).feed(b"\x82\x00") == [(FAIL, (1002, "client frames must be masked"))]


def test_frames_after_a_pong_in_the_same_read_are_parsed():
    assert parse(client_frame(10, b"p") + client_frame(2, b"m")) == [(PONG, b"p"), (BINARY, b"m")]


def test_a_text_frame_checked_in_pieces_leaves_no_utf8_check_behind():
    # The next message, fragmented binary that is not UTF-8, is not checked as text.
    parser = FrameParser(1000)
    text = client_frame(1, "é".encode() * 20)
    assert parser.feed(text[:10]) == []
    binary = client_frame(2, b"\xff", fin=False) + client_frame(0, b"\xfe")
    assert parser.feed(text[10:] + binary) == [(TEXT, "é" * 20), (BINARY, b"\xff\xfe")]


def test_a_parser_that_fails_on_resume_is_not_held():
    parser = FrameParser(1000, pass_bytes=10)
    assert parser.feed(client_frame(2, b"x" * 20) + client_frame(3)) == [(BINARY, b"x" * 20)]
    assert parser.held
    assert parser.resume() == [(FAIL, (1002, "unknown data opcode 0x3"))]
    assert not parser.held
    fresh = FrameParser(1000)
    assert fresh.feed(client_frame(3)) == [(FAIL, (1002, "unknown data opcode 0x3"))]
    assert not fresh.held


def test_invalid_utf8_inside_one_frame_fails_before_the_frame_is_complete():
    # Autobahn 6.4.3/6.4.4: the frame arrives in chops; the bad byte is in the second one
    whole = client_frame(1, "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"edited")
    parser = FrameParser(1000)
    assert parser.feed(whole[:10]) == []
    assert parser.feed(whole[10:20]) == [(FAIL, (1007, "invalid UTF-8 in a text message"))]


def test_invalid_utf8_in_a_continuation_frame_fails_before_that_frame_is_complete():
    parser = FrameParser(1 << 20)
    continuation = client_frame(0, b"\xff" + b"x" * 100)
    events = parser.feed(client_frame(1, b"ok", fin=False) + continuation[:10])
    assert events == [(FAIL, (1007, "invalid UTF-8 in a text message"))]


def test_the_parser_unmasks_with_the_routine_it_is_given():
    # The server passes Tornado's C routine; a parser that ignored it would be slower, silently.
    unmasked = []

    def recording(mask, data):
        unmasked.append(len(data))
        return unmask(mask, data)

    assert FrameParser(1000, unmask=recording).feed(client_frame(2, b"abc")) == [(BINARY, b"abc")]
    assert unmasked == [3]


def test_valid_text_checked_in_chops_is_not_checked_twice():
    text = "κόσμε €" * 10
    data = client_frame(1, text.encode()[:30], fin=False) + client_frame(0, text.encode()[30:])
    parser = FrameParser(1000)
    events = []
    for i in range(0, len(data), 3):
        events += parser.feed(data[i : i + 3])
    assert events == [(TEXT, text)]


def fragmented(count, opcode=2, piece=b"a"):
    """One message in ``count`` frames of ``piece`` each."""
    first = client_frame(opcode, piece, fin=count == 1)
    middle = client_frame(0, piece, fin=False) * (count - 2)
    return first + middle + (client_frame(0, piece) if count > 1 else b"")


def test_a_message_may_come_in_as_many_fragments_as_the_limit_and_not_one_more():
    assert FrameParser(1000, max_fragments=3).feed(fragmented(3)) == [(BINARY, b"aaa")]
    events = FrameParser(1000, max_fragments=3).feed(fragmented(4))
    assert events == [(FAIL, (1009, "message in more than 3 fragments"))]


def test_autobahn_9_3_1_as_the_real_wstest_sends_it_is_within_the_fragment_limit():
    # The real wstest sends 4 MiB in 64-byte fragments as 2**16 full frames and an empty
    # final one, 65,537 frames (kosoku sends one fewer, so only the real wstest saw a 1009).
    full = client_frame(1, b"x" * 64, fin=False) + client_frame(0, b"x" * 64, fin=False) * (2**16 - 1)
    assert FrameParser(1 << 23).feed(full + client_frame(0, b"", fin=True)) == [(TEXT, "x" * 64 * 2**16)]


def test_the_default_fragment_limit_of_2_17_holds_for_empty_fragments_too():
    # Empty continuation frames never grow the message: only the count stops them. The
    # default is 2**17, twice what the real Autobahn wstest sends (see MAX_FRAGMENTS).
    assert MAX_FRAGMENTS == 2**17
    data = client_frame(1, b"", fin=False) + client_frame(0, b"", fin=False) * 2**17
    assert FrameParser(1000).feed(data) == [(FAIL, (1009, "message in more than 131072 fragments"))]
    assert FrameParser(1 << 20).feed(fragmented(2**17, opcode=1)) == [(TEXT, "a" * 2**17)]


def test_a_pass_consumes_at_most_its_budget_then_resume_goes_on():
    message = client_frame(2, b"x" * 20)  # 26 bytes
    parser = FrameParser(1000, pass_bytes=60)
    assert parser.feed(message * 5) == [(BINARY, b"x" * 20)] * 3  # the third frame crosses 60
    assert parser.held
    assert parser.feed(message) == []  # nothing more until the next pass
    assert parser.resume() == [(BINARY, b"x" * 20)] * 3
    assert parser.held  # this pass's budget is spent too, though nothing waits
    assert parser.resume() == []
    assert not parser.held
    big = client_frame(2, b"y" * 100)  # a frame over the budget still goes through, alone
    assert parser.feed(big + message) == [(BINARY, b"y" * 100)]
    assert parser.held
    assert parser.resume() == [(BINARY, b"x" * 20)]
    assert not parser.held


def test_a_pass_that_ends_in_a_partial_frame_is_not_held_and_the_frame_spends_what_is_left():
    message = client_frame(2, b"x" * 20)  # 26 bytes
    big = client_frame(2, b"y" * 30)  # 36 bytes: it starts at 26, with 34 bytes of the pass left
    parser = FrameParser(1000, pass_bytes=60)
    assert parser.feed(message + big[:10]) == [(BINARY, b"x" * 20)]
    assert not parser.held  # the budget is not spent: the caller waits for bytes, not for resume()
    # The big frame completes in the same pass and crosses its end: the message behind it waits.
    assert parser.feed(big[10:] + message) == [(BINARY, b"y" * 30)]
    assert parser.held
    assert parser.resume() == [(BINARY, b"x" * 20)]
    assert not parser.held


@given(
    st.lists(st.binary(max_size=300).map(lambda b: (2, b)), max_size=8),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=400),
)
@settings(max_examples=200, deadline=None)
def test_fuzz_messages_survive_any_pass_budget(messages, chunk, budget):
    wire = b""
    for opcode, payload in messages:
        pieces = [payload[i : i + 50] for i in range(0, len(payload), 50)] or [b""]
        for i, piece in enumerate(pieces):
            wire += client_frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1)
    parser = FrameParser(1 << 20, pass_bytes=budget)
    events = []
    for i in range(0, len(wire), chunk):
        events += parser.feed(wire[i : i + chunk])
        while parser.held:
            events += parser.resume()
    assert events == [(BINARY, p) for _, p in messages]


# -- permessage-deflate (RFC 7692) ---------------------------------------------------------


def deflated(data, wbits=15):
    compressor = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflating(limit=1 << 20):
    return FrameParser(limit, deflate=True)


def test_rsv1_marks_a_compressed_message_once_negotiated():
    text = "héllo " * 100
    packed = deflated(text.encode())
    assert inflating().feed(client_frame(1, packed, rsv=0x40) + client_frame(2, deflated(b"\x00" * 50), rsv=0x40)) == [
        (TEXT, text),
        (BINARY, b"\x00" * 50),
    ]
    # uncompressed messages still pass on a compressed connection
    assert inflating().feed(client_frame(1, b"plain")) == [(TEXT, "plain")]
    # without the extension, RSV1 is still a protocol error
    assert parse(client_frame(1, packed, rsv=0x40)) == [
        (FAIL, (1002, "reserved bits set without a negotiated extension"))
    ]


def test_a_compressed_message_in_fragments_with_a_ping_between():
    packed = deflated(b"fragmented " * 50)
    events = inflating().feed(
        client_frame(1, packed[:5], fin=False, rsv=0x40)
        + client_frame(9, b"p")
        + client_frame(0, packed[5:9], fin=False)
        + client_frame(0, packed[9:])
    )
    assert events == [(PING, b"p"), (TEXT, "fragmented " * 50)]


def test_a_compressed_frame_arriving_in_pieces_is_not_checked_as_utf8_before_inflating():
    packed = deflated("ünïcode ".encode() * 200)
    data = client_frame(1, packed, rsv=0x40)
    parser = inflating()
    events = []
    for i in range(0, len(data), 7):
        events += parser.feed(data[i : i + 7])
    assert events == [(TEXT, "ünïcode " * 200)]


@pytest.mark.parametrize(
    ("frame_bytes", "reason"),
    [
        (client_frame(9, b"x", rsv=0x40), "RSV1 set on a frame with opcode 0x9"),
        (client_frame(8, b"\x03\xe8", rsv=0x40), "RSV1 set on a frame with opcode 0x8"),
        (client_frame(1, b"a", fin=False) + client_frame(0, b"b", rsv=0x40), "RSV1 set on a frame with opcode 0x0"),
        (client_frame(1, b"a", rsv=0x20), "reserved bits set without a negotiated extension"),
    ],
    ids=["ping", "close", "continuation", "rsv2"],
)
def test_rsv1_on_control_or_continuation_frames_is_a_protocol_error(frame_bytes, reason):
    assert inflating().feed(frame_bytes)[-1] == (FAIL, (1002, reason))


def test_a_zip_bomb_fails_with_1009_without_allocating_what_it_inflates_to():
    bomb = deflated(b"\x00" * (256 << 20))  # 256 MiB of zeros in about 256 KiB
    data = client_frame(2, bomb, rsv=0x40)
    parser = inflating(limit=1 << 20)
    tracemalloc.start()
    try:
        events = parser.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events == [(FAIL, (1009, "message inflates to more than 1048576 bytes"))]
    assert peak < 4 * (1 << 20) + 2 * len(data)


def test_the_inflated_size_counts_and_a_message_of_the_limit_passes():
    limit = 1000
    assert inflating(limit).feed(client_frame(2, deflated(b"a" * limit), rsv=0x40)) == [(BINARY, b"a" * limit)]
    assert inflating(limit).feed(client_frame(2, deflated(b"a" * (limit + 1)), rsv=0x40)) == [
        (FAIL, (1009, "message inflates to more than 1000 bytes"))
    ]
    # incompressible data grows a little when deflated: a message of the limit is accepted
    noise = os.urandom(limit)
    assert inflating(limit).feed(client_frame(2, deflated(noise), rsv=0x40)) == [(BINARY, noise)]
    # frames after a compressed message are parsed; after one that inflates too far, none is
    ping = client_frame(9, b"p")
    compressed = client_frame(2, deflated(b"a" * limit), rsv=0x40)
    assert inflating(limit).feed(compressed + ping) == [(BINARY, b"a" * limit), (PING, b"p")]
    too_big = client_frame(2, deflated(b"a" * (limit + 1)), rsv=0x40)
    assert inflating(limit).feed(too_big + ping) == [(FAIL, (1009, "message inflates to more than 1000 bytes"))]
    # and in fragments too: the allowance holds for the whole compressed message
    wire = deflated(noise)
    assert len(wire) > limit
    fragments = client_frame(2, wire[:500], fin=False, rsv=0x40) + client_frame(0, wire[500:])
    assert inflating(limit).feed(fragments) == [(BINARY, noise)]


def test_compressed_text_is_validated_after_inflating_and_garbage_fails_1007():
    assert inflating().feed(client_frame(1, deflated(b"\xff\xfe" * 40), rsv=0x40)) == [
        (FAIL, (1007, "invalid UTF-8 in a text message"))
    ]
    ping = client_frame(9, b"p")
    (kind, (code, reason)), *after = inflating().feed(client_frame(2, b"\xff" * 20, rsv=0x40) + ping)
    assert (kind, code, after) == (FAIL, 1007, [])
    assert reason.startswith("a compressed message that does not inflate")
    assert inflating().feed(client_frame(1, deflated(b"\xff\xfe" * 40), rsv=0x40) + ping) == [
        (FAIL, (1007, "invalid UTF-8 in a text message"))
    ]


# -- negotiation and the sending side ------------------------------------------------------------

ACCEPTED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        ("", None),
        ("permessage-deflate", (ACCEPTED, 15)),
        ("Permessage-Deflate; client_max_window_bits", (ACCEPTED, 15)),
        ("permessage-deflate; client_max_window_bits=10; server_no_context_takeover", (ACCEPTED, 15)),
        ('permessage-deflate; server_max_window_bits="12"', (ACCEPTED + "; server_max_window_bits=12", 12)),
        ("permessage-deflate; server_max_window_bits=8", (ACCEPTED + "; server_max_window_bits=8", 8)),
        ("permessage-deflate; server_max_window_bits", None),  # needs a value
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=09", None),
        ("permessage-deflate; client_max_window_bits=7", None),
        ("permessage-deflate; client_no_context_takeover=1", None),
        ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None),
        ("permessage-deflate; unknown", None),
        ("x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=20, permessage-deflate", (ACCEPTED, 15)),
    ],
)
def test_negotiate(offer, answer):
    assert deflate.negotiate(offer) == answer


@pytest.mark.parametrize("window_bits", range(8, 16))
def test_compress_stays_within_the_window_and_inflates(window_bits):
    data = os.urandom(200) * 300  # repeats 200 bytes back: only a 2**8 window cannot reach them
    packed = deflate.compress(data, window_bits)
    assert zlib.decompressobj(-max(window_bits, 9)).decompress(packed + b"\x00\x00\xff\xff") == data
    if window_bits >= 9:
        assert len(packed) < len(data) // 10


class CountedChunk(bytes):
    """A read whose bytes count every time the parser copies them into a bigger buffer."""

    copied = 0

    def __radd__(self, other):
        CountedChunk.copied += len(other) + len(self)
        return bytes(other) + bytes(self)


def test_a_large_frame_in_many_reads_is_joined_once_not_copied_by_every_read():
    # Each read of a frame larger than what has arrived used to copy everything before it
    # again (buf + data): 16 MiB in 64 KiB reads copied about 2 GiB and held the loop.
    payload = b"x" * (4 * 1024 * 1024)
    wire = client_frame(2, payload)
    parser = FrameParser(len(payload))
    CountedChunk.copied = 0
    events = []
    for i in range(0, len(wire), 64 * 1024):
        events += parser.feed(CountedChunk(wire[i : i + 64 * 1024]))
    assert events == [(BINARY, payload)]
    assert CountedChunk.copied < 2 * len(wire)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1014, 3000, 3999, 4000, 4999])
def test_close_codes_a_peer_may_send(code):
    # RFC 6455 §7.4.1 and the IANA registry: each end of each range is valid ...
    assert valid_close_code(code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_a_peer_may_not_send(code):
    # ... and the code just past it is not (a range shifted by one fails here).
    assert not valid_close_code(code)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 7, 8, 125, 126, 4096, 65537])
def test_the_pure_python_unmasker_agrees_with_tornados_c_one(size):
    # The parser's default unmasker is the standard-library one; the server passes Tornado's
    # C routine. Both must give the same bytes, or the core's own tests prove nothing.
    from tornado.speedups import websocket_mask

    rng = random.Random(size)
    mask = rng.randbytes(4)
    data = rng.randbytes(size)
    assert unmask(mask, data) == websocket_mask(mask, data)
    assert unmask(mask, unmask(mask, data)) == data
