"""How a count reads in logs, status lines and messages: ``1 idle object``, ``2 idle objects``."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, singular for exactly one, else ``plural`` (``noun + "s"`` by default)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
