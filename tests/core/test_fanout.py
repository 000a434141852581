"""A broadcast's message, encoded once, and a class's slow-consumer policy (wsecho.core.fanout).

What every socket receives (exactly once, in order, the overflow policy) is checked end to end in
tests/integration/test_broadcast.py; these check the policy's validation and the shared frames.
"""

import zlib

import pytest

from wsecho.core import frames
from wsecho.core.errors import InvalidArgumentError
from wsecho.core.fanout import MIN_QUEUE_BYTES, Fanout, FanoutPolicy, Overflow, policy_for


def test_a_policy_takes_the_class_queue_limit_or_the_servers():
    assert policy_for("Room", "drop", None, 1 << 20) == FanoutPolicy(Overflow.DROP, 1 << 20)
    assert policy_for("Room", "close", 65536, 1 << 20) == FanoutPolicy(Overflow.CLOSE, 65536)


def test_the_smallest_queue_limit_is_64_kib_as_documented():
    assert MIN_QUEUE_BYTES == 64 * 1024  # docs/api.md: "at least 64 KiB"
    assert policy_for("Room", "drop", 65536, 65536).queue_bytes == 65536
    with pytest.raises(InvalidArgumentError, match=r"at least 65536 .* got 65535"):
        policy_for("Room", "drop", 65535, 65536)


@pytest.mark.parametrize("overflow", ["DROP", "kill", None, 1, Overflow.DROP])
def test_an_unknown_overflow_is_refused_naming_the_choices_and_the_value(overflow):
    with pytest.raises(InvalidArgumentError) as raised:
        policy_for("Room", overflow, None, MIN_QUEUE_BYTES)
    assert str(raised.value) == f"Room.fanout_overflow must be one of 'drop', 'close', got {overflow!r}"


@pytest.mark.parametrize("size", [MIN_QUEUE_BYTES - 1, 0, -1, True, 65536.0, "65536"])
def test_a_queue_limit_below_the_minimum_or_not_an_integer_is_refused_naming_it(size):
    with pytest.raises(InvalidArgumentError) as raised:
        policy_for("Room", "drop", size, MIN_QUEUE_BYTES)
    assert str(raised.value) == (
        f"Room.fanout_queue_bytes must be an integer of at least {MIN_QUEUE_BYTES} (or None), got {size!r}"
    )


def test_the_servers_default_is_checked_too():
    with pytest.raises(InvalidArgumentError, match="got 1024"):
        policy_for("Room", "drop", None, 1024)


@pytest.mark.parametrize("message", ["hello", b"\x00\x01", "x" * 70_000])
def test_a_fanout_builds_the_server_frame_once(message):
    policy = FanoutPolicy(Overflow.CLOSE, 1 << 20)
    fanout = Fanout(message, policy)
    assert fanout.frame == frames.message_frame(message)
    assert fanout.message == message
    assert fanout.policy is policy


def test_the_compressed_frame_is_built_once_per_window_and_inflates_to_the_message():
    fanout = Fanout("hello hello hello", FanoutPolicy(Overflow.DROP, MIN_QUEUE_BYTES))
    wide = fanout.deflated(15)
    assert fanout.deflated(15) is wide  # built once, shared by every socket with that window
    narrow = fanout.deflated(9)
    assert narrow == frames.deflated_frame("hello hello hello", 9)
    assert fanout.deflated(9) is narrow
    assert wide == frames.deflated_frame("hello hello hello", 15)
    assert wide[0] == 0xC1  # FIN, RSV1 (compressed), text
    payload = wide[2:]
    assert zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff") == b"hello hello hello"
