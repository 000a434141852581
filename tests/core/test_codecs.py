"""Property tests and fuzzing of the two value codecs (attachments and storage)."""

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsecho.api import attachment, codec
from wsecho.core.errors import InvalidArgumentError

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
storage_values = st.recursive(
    json_scalars | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_attachments_round_trip(value):
    assert attachment.decode(attachment.encode(value, 1 << 20)) == value


@given(storage_values)
@settings(max_examples=300, deadline=None)
def test_storage_values_round_trip_including_bytes_and_dollar_keys(value):
    assert codec.decode(codec.encode(value)) == value


@given(st.dictionaries(st.sampled_from(["$b", "$d", "$x", "a"]), st.text(max_size=4) | st.binary(max_size=4)))
@settings(max_examples=200, deadline=None)
def test_user_dicts_that_look_like_escapes_survive(value):
    assert codec.decode(codec.encode(value)) == value


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decoding_arbitrary_bytes_only_ever_raises_value_errors(data):
    # what decode sees is what wsecho wrote, but a corrupted file must not do worse than raise
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError):
        codec.decode(data)


@pytest.mark.parametrize("bad", [{1, 2}, object(), float("nan"), {1: "a"}, [b"x"]])
def test_attachments_refuse_what_json_cannot_hold(bad):
    with pytest.raises(InvalidArgumentError):
        attachment.encode(bad, 1 << 20)


@pytest.mark.parametrize("value", ["\ud800", {"text": "a\udfffb"}, ["ok", "\udc80"]])
def test_a_lone_surrogate_is_an_invalid_argument_not_a_unicode_error(value):
    # Red team L6: storage.put raised UnicodeEncodeError (a traceback, no answer).
    with pytest.raises(InvalidArgumentError, match="lone surrogate"):
        codec.encode(value)
