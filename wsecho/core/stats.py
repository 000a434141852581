"""What the runtime counts beyond plain counters: labelled counts and latency histograms.

Sans-IO and dependency-free; the admin listener turns them into Prometheus metrics.
"""

from __future__ import annotations

import bisect
from collections import Counter

import attrs

#: RFC 6455 §7.4.1 and the IANA "WebSocket Close Code Number Registry": the codes wsecho
#: counts by number (1004, 1005, 1006 and 1015 are never sent, but 1005 and 1006 are reported).
CLOSE_CODE_NAMES = {
    1000: "normal_closure",
    1001: "going_away",
    1002: "protocol_error",
    1003: "unsupported_data",
    1004: "reserved",
    1005: "no_status_received",
    1006: "abnormal_closure",
    1007: "invalid_frame_payload_data",
    1008: "policy_violation",
    1009: "message_too_big",
    1010: "mandatory_extension",
    1011: "internal_error",
    1012: "service_restart",
    1013: "try_again_later",
    1014: "bad_gateway",
    1015: "tls_handshake",
}


def close_code_bucket(code: int) -> tuple[str, str]:
    """The ``(code, name)`` labels a close is counted under: a registered code by its number and
    name, the ranges RFC 6455 §7.4.2 leaves to others as one bucket each.

    A peer picks its close code, so counting every code apart would let it add a metric series
    per code it sends (up to 2,000 of them in 3000-4999).
    """
    if code in CLOSE_CODE_NAMES:
        return str(code), CLOSE_CODE_NAMES[code]
    if 3000 <= code <= 3999:
        return "3000-3999", "registered"  # for libraries, frameworks and applications, via IANA
    if 4000 <= code <= 4999:
        return "4000-4999", "private_use"
    return "other", "other"


#: Calls between cluster members (wsecho.serve.peers), by direction and result. Out: "ok", the
#: callee's "error" raised in the caller, "failed" (no member served it, or it did not answer),
#: and each "retry". In: "ok", "error", "not_owner" (the lease is not provable here) and
#: "refused" (a wrong or missing signature, or a malformed call).
PEER_CALL_RESULTS = (
    *(("out", result) for result in ("ok", "error", "failed", "retry")),
    *(("in", result) for result in ("ok", "error", "not_owner", "refused")),
)


#: Wake latency buckets in seconds: 50 µs to 1 s.
WAKE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


@attrs.define(eq=False)
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense, without the dependency."""

    buckets: tuple[float, ...]
    counts: list[int] = attrs.field()
    total: float = 0.0
    count: int = 0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound, observations <= it), ..., ("+Inf", all)]``."""
        out, running = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


#: Why an instance was dropped: hibernation (idle, or to bound memory), or one of the resets.
RESET_REASONS = ("abort", "event_timeout", "storage_error")
EVICTION_REASONS = ("idle", "limit", "memory", *RESET_REASONS)


@attrs.define(eq=False)
class Stats:
    """Everything one runtime counts: the one place each count lives.

    The hot paths add to plain ``int`` fields (``stats.messages_in += 1``); readers (the
    admin listener, ``wsecho.testing``, tests) take a :meth:`snapshot`, a frozen copy.
    """

    #: WebSocket handshakes completed.
    sockets_accepted: int = 0
    #: Messages received from peers, and messages objects sent.
    messages_in: int = 0
    messages_out: int = 0
    #: Messages answered by the auto-response, without waking the object.
    auto_responses: int = 0
    #: Hibernated objects woken (the constructor ran again).
    wakes: int = 0
    #: Constructors that raised (the wake failed; the object's sockets closed with 1011).
    constructor_errors: int = 0
    #: Events dropped because their object was reset before they ran.
    dropped_events: int = 0
    #: Alarms delivered, retried after their handler failed, and given up after the last retry.
    alarms: int = 0
    alarm_retries: int = 0
    alarms_given_up: int = 0
    #: Storage commits that failed.
    storage_errors: int = 0
    #: Connections cut because the peer did not answer our ping or did not read.
    dead_peers: int = 0
    #: ``ctx.broadcast`` calls; deliveries a slow socket missed (its class drops), and slow
    #: sockets cut with 1008 (its class closes), past the per-socket fan-out queue limit.
    broadcasts: int = 0
    fanout_dropped: int = 0
    fanout_closed: int = 0
    #: Outbound WebSockets (``ctx.connect_web_socket``) opened, and attempts that failed.
    outbound_opened: int = 0
    outbound_failed: int = 0
    #: Objects built while --max-active-objects were in memory and none of them could hibernate.
    over_limit: int = 0
    #: Final events by :func:`close_code_bucket` (1006 for dropped connections, 1009/1007/1002
    #: for failures): at most 19 keys, whatever codes the peers send.
    closed_by_code: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    #: Handler exceptions by handler name (fetch, web_socket_message, alarm, ...).
    handler_errors: Counter[str] = attrs.field(factory=Counter)
    #: Instances dropped, by why (:data:`EVICTION_REASONS`): idle, limit and memory are hibernations, the rest resets.
    evictions: Counter[str] = attrs.field(factory=Counter)
    #: put() calls refused by a storage quota: "object" or "total".
    quota_refusals: Counter[str] = attrs.field(factory=Counter)
    #: Code reloads (``--reload-code``, ``--reload``) by result: "ok" or "failed".
    code_reloads: Counter[str] = attrs.field(factory=Counter)
    #: Calls between cluster members by (direction, result) (:data:`PEER_CALL_RESULTS`).
    peer_calls: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    #: From an event's arrival at a hibernated object to the start of its handler.
    wake_latency: Histogram = attrs.field(factory=lambda: Histogram(WAKE_BUCKETS))

    def count_close(self, code: int) -> None:
        self.closed_by_code[close_code_bucket(code)] += 1

    def snapshot(self) -> StatsSnapshot:
        """A frozen copy of every count, for readers."""
        return StatsSnapshot(
            **{f.name: getattr(self, f.name) for f in attrs.fields(Stats) if f.type in ("int", int)},
            closed_by_code=dict(self.closed_by_code),
            handler_errors=dict(self.handler_errors),
            evictions={reason: self.evictions[reason] for reason in EVICTION_REASONS},
            quota_refusals={which: self.quota_refusals[which] for which in ("object", "total")},
            code_reloads={result: self.code_reloads[result] for result in ("ok", "failed")},
            peer_calls={key: self.peer_calls[key] for key in PEER_CALL_RESULTS},
            wake_latency=tuple(self.wake_latency.cumulative()),
            wake_latency_sum=self.wake_latency.total,
        )


@attrs.frozen
class StatsSnapshot:
    """What :meth:`Stats.snapshot` returns: the counts at one moment, never changing after."""

    sockets_accepted: int
    messages_in: int
    messages_out: int
    auto_responses: int
    wakes: int
    constructor_errors: int
    dropped_events: int
    alarms: int
    alarm_retries: int
    alarms_given_up: int
    storage_errors: int
    dead_peers: int
    broadcasts: int
    fanout_dropped: int
    fanout_closed: int
    outbound_opened: int
    outbound_failed: int
    over_limit: int
    closed_by_code: dict[tuple[str, str], int]
    handler_errors: dict[str, int]
    evictions: dict[str, int]
    quota_refusals: dict[str, int]
    code_reloads: dict[str, int]
    peer_calls: dict[tuple[str, str], int]
    #: ``[(upper bound, observations <= it), ..., ("+Inf", all)]``
    wake_latency: tuple[tuple[str, int], ...]
    wake_latency_sum: float

    @property
    def resets(self) -> int:
        """Instances dropped for a reason other than hibernation."""
        return sum(self.evictions[reason] for reason in RESET_REASONS)

    @property
    def event_timeouts(self) -> int:
        return self.evictions["event_timeout"]
