"""What storage writes travel in: one object's writes from one turn, and what an entry costs.

A :class:`Batch` is applied whole or not at all (see :mod:`wsecho.backends`); the quota
counts each entry as :func:`entry_bytes`.
"""

from __future__ import annotations

from types import EllipsisType

import attrs

from wsecho.core.alarms import AlarmRow


@attrs.define(eq=False)
class Batch:
    """One object's writes from one turn: applied all together or not at all."""

    object: str
    #: delete_all(): remove every committed key before applying ``writes``.
    clear: bool = False
    #: key -> encoded value, or None to delete the key.
    writes: dict[str, bytes | None] = attrs.field(factory=dict)
    #: The object's alarm after this batch: a row to store, None to delete, or
    #: ``...`` (the default) for "unchanged".
    alarm: AlarmRow | EllipsisType | None = ...
    #: How many bytes these writes add to the object's usage, as far as the writer knew
    #: (an overwrite of a value it had not read counts whole): for the quota checks.
    growth: int = 0

    def empty(self) -> bool:
        return not self.clear and not self.writes and self.alarm is ...


def entry_bytes(key: str, value: bytes) -> int:
    """What one stored entry counts against the quotas."""
    return len(key.encode("utf-8")) + len(value)
