"""The runtime on asyncio (no Tornado): hosts, turns, commits and the output gate, alarms, ctx services."""

from wsecho.runtime.runtime import Runtime

__all__ = ["Runtime"]
