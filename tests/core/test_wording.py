"""Counts in logs and status lines read as English: ``1 idle object``, never ``1 idle objects``."""

import pytest

from wsecho.core.wording import counted


@pytest.mark.parametrize(
    ("n", "words", "expected"),
    [
        (0, ("idle object",), "0 idle objects"),
        (1, ("idle object",), "1 idle object"),
        (2, ("idle object",), "2 idle objects"),
        (1, ("event is", "events are"), "1 event is"),
        (3, ("event is", "events are"), "3 events are"),
    ],
)
def test_one_is_singular_and_every_other_count_plural(n, words, expected):
    assert counted(n, *words) == expected
