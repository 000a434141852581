"""Prometheus metrics of a running server, read from the runtime at scrape time.

Nothing here is updated on the hot path: the runtime keeps plain counts
(:class:`wsecho.core.stats.Stats`), and :class:`RuntimeCollector` turns them into metric
families when ``/metrics`` is scraped. Each server has its own registry (no
process-wide one), so several servers can run in one process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from wsecho.core.lifecycle import ObjectState
from wsecho.core.stats import PEER_CALL_RESULTS

if TYPE_CHECKING:
    from wsecho.runtime.runtime import Runtime
    from wsecho.serve.memory import MemoryGuard

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: Every plain count of :class:`~wsecho.core.stats.Stats`, as ``field: (metric, HELP)``. A test
#: checks that no field is missing, so a new count cannot be left out of /metrics.
COUNTERS = {
    "sockets_accepted": ("wsecho_sockets_accepted", "WebSocket handshakes completed"),
    "messages_in": ("wsecho_messages_received", "WebSocket messages received"),
    "messages_out": ("wsecho_messages_sent", "WebSocket messages sent by objects"),
    "auto_responses": ("wsecho_auto_responses", "messages answered by the auto-response"),
    "wakes": ("wsecho_wakes", "hibernated objects woken (constructor run again)"),
    "constructor_errors": ("wsecho_constructor_errors", "constructors that raised (the wake failed)"),
    "dropped_events": ("wsecho_dropped_events", "queued events dropped because their object was reset"),
    "alarms": ("wsecho_alarms", "alarms delivered"),
    "alarm_retries": ("wsecho_alarm_retries", "alarms retried after their handler failed"),
    "alarms_given_up": ("wsecho_alarms_given_up", "alarms deleted after their last retry failed"),
    "storage_errors": ("wsecho_storage_errors", "storage commits that failed"),
    "dead_peers": (
        "wsecho_dead_peers",
        "connections cut because the peer did not answer our ping or did not read for --ping-timeout",
    ),
    "broadcasts": ("wsecho_broadcasts", "ctx.broadcast() calls"),
    "fanout_dropped": (
        "wsecho_fanout_dropped",
        "broadcast messages a socket missed because its queue was over the fan-out limit (fanout_overflow drop)",
    ),
    "fanout_closed": (
        "wsecho_fanout_closed",
        "sockets closed with 1008 because their queue was over the fan-out limit (fanout_overflow close)",
    ),
    "outbound_opened": ("wsecho_outbound_opened", "outbound WebSockets opened (ctx.connect_web_socket)"),
    "outbound_failed": ("wsecho_outbound_failed", "outbound WebSockets that could not connect"),
    "over_limit": (
        "wsecho_active_objects_over_limit",
        "objects woken while --max-active-objects were in memory and none of them could hibernate",
    ),
}


class RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime, loop_lag: Callable[[], float], loop_blocked: Callable[[], int]) -> None:
        self._runtime = runtime
        self._loop_lag = loop_lag
        self._loop_blocked = loop_blocked

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime
        stats = rt.stats.snapshot()
        hosts = rt.hosts()

        open_sockets = GaugeMetricFamily("wsecho_sockets_open", "WebSockets whose final event is not delivered yet")
        open_sockets.add_metric([], sum(len(h.sockets) for h in hosts))
        yield open_sockets
        for field, (name, documentation) in COUNTERS.items():
            yield _counter(name, documentation, getattr(stats, field))

        closed = CounterMetricFamily(
            "wsecho_sockets_closed",
            "WebSockets ended, by close code (1006: dropped; 3000-3999, 4000-4999 and other: one series each)",
            labels=["code", "name"],
        )
        for (code, name), n in sorted(stats.closed_by_code.items()):
            closed.add_metric([code, name], n)
        yield closed

        states: Counter[str] = Counter(h.lifecycle.state.value for h in hosts)
        objects = GaugeMetricFamily("wsecho_objects", "objects known to the runtime, by state", labels=["state"])
        for state in ObjectState:
            objects.add_metric([state.value], states[state.value])
        yield objects

        evictions = CounterMetricFamily(
            "wsecho_evictions",
            "instances dropped, by reason (idle: hibernation; limit: --max-active-objects; memory: memory pressure; "
            "abort, event_timeout, storage_error: resets)",
            labels=["reason"],
        )
        for reason, n in stats.evictions.items():
            evictions.add_metric([reason], n)
        yield evictions

        latency = HistogramMetricFamily(
            "wsecho_wake_latency_seconds",
            "from an event's arrival at an object without an instance (hibernated, or never loaded) to its handler",
        )
        latency.add_metric([], list(stats.wake_latency), stats.wake_latency_sum)
        yield latency

        errors = CounterMetricFamily(
            "wsecho_handler_errors", "exceptions raised by handlers, by handler", labels=["handler"]
        )
        for name, n in sorted(stats.handler_errors.items()):
            errors.add_metric([name], n)
        yield errors
        refusals = CounterMetricFamily(
            "wsecho_storage_quota_refusals", "put() calls refused by a storage quota", labels=["quota"]
        )
        for which, n in stats.quota_refusals.items():
            refusals.add_metric([which], n)
        yield refusals
        reloads = CounterMetricFamily(
            "wsecho_code_reloads", "code reloads (--reload-code, --reload), by result", labels=["result"]
        )
        for result, n in stats.code_reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        peers = CounterMetricFamily(
            "wsecho_peer_calls",
            "calls between cluster members (out: this member's objects calling another's; in: answered "
            "for another member), by result",
            labels=["direction", "result"],
        )
        for direction, result in PEER_CALL_RESULTS:
            peers.add_metric([direction, result], stats.peer_calls[direction, result])
        yield peers

        yield _counter("wsecho_storage_commits", "storage transactions committed", rt.committer.commits)
        yield _counter(
            "wsecho_storage_batches", "object write batches committed (many share a commit)", rt.committer.batches
        )
        stored = GaugeMetricFamily("wsecho_storage_bytes", "bytes stored by all objects (keys plus values)")
        stored.add_metric([], rt.committer.stored_bytes)
        yield stored

        lag = GaugeMetricFamily(
            "wsecho_event_loop_lag_seconds", "how late the event loop ran a timer, last second's worst"
        )
        lag.add_metric([], self._loop_lag())
        yield lag
        yield _counter(
            "wsecho_event_loop_blocked",
            "times the event loop was blocked longer than --warn-blocked (each logged with the stack)",
            self._loop_blocked(),
        )


@attrs.frozen
class ListenerStats:
    """A snapshot of the listener's connection and memory accounting."""

    #: Plain HTTP connections open (not upgraded).
    http_connections: int
    #: Bytes of request bodies held or reserved.
    body_bytes: int
    #: Times a listener paused because accept() failed (out of descriptors).
    accept_pauses: int
    #: Connections and requests turned away, by reason.
    refused: dict[str, int]
    #: With --workers: connections handed to the worker that owns their object, and received.
    handed_over: int = 0
    adopted: int = 0


#: Why the listener turns a connection or request away (the ``reason`` label).
REFUSAL_REASONS = ("websocket_limit", "http_limit", "body_memory", "descriptors")


class ListenerCollector(Collector):
    def __init__(self, stats: Callable[[], ListenerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        http = GaugeMetricFamily("wsecho_http_connections_open", "plain HTTP connections open (keep-alive too)")
        http.add_metric([], stats.http_connections)
        yield http
        body = GaugeMetricFamily("wsecho_request_body_bytes", "bytes of request bodies held in memory or reserved")
        body.add_metric([], stats.body_bytes)
        yield body
        yield _counter(
            "wsecho_accept_pauses", "times accepting paused because accept() failed (EMFILE)", stats.accept_pauses
        )
        refused = CounterMetricFamily(
            "wsecho_refused", "connections and requests turned away at a limit, by reason", labels=["reason"]
        )
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], stats.refused.get(reason, 0))
        yield refused
        moved = CounterMetricFamily(
            "wsecho_connections_moved",
            "connections handed to the worker that owns their object (--workers), by direction",
            labels=["direction"],
        )
        moved.add_metric(["out"], stats.handed_over)
        moved.add_metric(["in"], stats.adopted)
        yield moved


class MemoryCollector(Collector):
    """The memory reading and marks of memory-pressure eviction, and the active-object limit."""

    def __init__(self, runtime: Runtime, memory: MemoryGuard | None) -> None:
        self._runtime = runtime
        self._memory = memory

    def collect(self) -> Iterator[Metric]:
        rt = self._runtime
        yield _gauge("wsecho_objects_in_memory", "objects with an instance in memory (or waking)", rt.active_count())
        yield _gauge(
            "wsecho_max_active_objects",
            "--max-active-objects: objects kept in memory at most (0: no limit)",
            rt.max_active_objects,
        )
        yield _gauge(
            "wsecho_memory_cap_objects",
            "objects kept in memory at most while memory is over the low-water mark after an eviction (0: no cap)",
            rt.memory_cap or 0,
        )
        memory = self._memory
        if memory is None or memory.reading is None:
            return
        reading = memory.reading
        used = GaugeMetricFamily(
            "wsecho_memory_used_bytes",
            "memory use that memory-pressure eviction watches: the cgroup's (less reclaimable cache) or the RSS",
            labels=["source"],
        )
        used.add_metric([reading.source], reading.used)
        yield used
        high, low = memory.marks()
        for name, mark, documentation in (
            ("wsecho_memory_high_bytes", high, "above this memory use, idle objects hibernate (--memory-high)"),
            ("wsecho_memory_low_bytes", low, "memory-pressure eviction brings memory use down to this (--memory-low)"),
        ):
            if mark is not None:
                yield _gauge(name, documentation, mark)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def make_registry(
    runtime: Runtime,
    loop_lag: Callable[[], float],
    listener: Callable[[], ListenerStats] | None = None,
    loop_blocked: Callable[[], int] = lambda: 0,
    memory: MemoryGuard | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime, loop_lag, loop_blocked))
    registry.register(MemoryCollector(runtime, memory))
    if listener is not None:
        registry.register(ListenerCollector(listener))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def merge_pages(pages: Mapping[int, bytes], extra: bytes = b"") -> bytes:
    """One exposition of every worker's page (``--workers N``): each sample gains a
    ``worker`` label, each family's HELP and TYPE lines appear once, before all its samples
    (the text format's rule); ``extra`` (the supervisor's own families) comes first."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for worker, page in sorted(pages.items()):
        current: tuple[list[str], list[str]] | None = None
        for line in page.decode("utf-8").splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) < 3:
                    continue
                name = parts[2]
                current = families.setdefault(name, ([], []))
                if line not in current[0]:
                    current[0].append(line)
            elif line and current is not None:
                current[1].append(_with_label(line, f'worker="{worker}"'))
    out = [extra.decode("utf-8").rstrip("\n")] if extra else []
    for header, samples in families.values():
        out.extend(header)
        out.extend(samples)
    return ("\n".join(out) + "\n").encode("utf-8")


def _with_label(sample: str, label: str) -> str:
    """``name{a="b"} 1`` -> ``name{a="b",worker="0"} 1``; ``name 1`` -> ``name{worker="0"} 1``."""
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        end = sample.rindex("} ") if "} " in sample else sample.rindex("}")
        inside = sample[brace + 1 : end]
        return f"{sample[: brace + 1]}{inside + ',' if inside else ''}{label}{sample[end:]}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"
