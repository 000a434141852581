"""``Server``: the composition root. It builds the runtime, the application's listener, the
admin listener, the sweeper and the periodic passes, and starts and stops them in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.tcpserver
import tornado.web
from tornado.ioloop import IOLoop, PeriodicCallback

from wsecho.backends.base import Backend, MemoryBackend, SQLiteBackend
from wsecho.backends.dsn import is_postgres_url, redact
from wsecho.backends.leases import FencedError, PostgresLeases, fence_sql
from wsecho.core.batches import Batch
from wsecho.core.errors import ConfigError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.limits import Limits
from wsecho.core.placement import Placement
from wsecho.core.target import AllowedHosts
from wsecho.core.wording import counted
from wsecho.runtime.cluster import ClusterMember, LeaseStore, machine_of
from wsecho.runtime.runtime import Runtime
from wsecho.runtime.watchdog import LoopWatchdog
from wsecho.serve.acceptor import MAX_RESERVED_FDS, descriptors_in_use, open_file_limit
from wsecho.serve.admin import (
    AdminSource,
    Healthz,
    Metrics,
    NotFound,
    Objects,
    Readiness,
    Readyz,
    log_admin_request,
    readiness_of,
)
from wsecho.serve.appcode import WATCH_INTERVAL, CodeReloader
from wsecho.serve.config import PEER_SCHEMES, RELOADABLE, TLS_FILES, WILDCARD_HOSTS, Settings, check_tls
from wsecho.serve.connection import Connection
from wsecho.serve.gateway import BODY_TIMEOUT, MAX_HEADER_BYTES, make_application
from wsecho.serve.haproxy import RouteKey, Teacher
from wsecho.serve.memory import MemoryGuard, memory_guard
from wsecho.serve.mesh import MeshClient
from wsecho.serve.metrics import ListenerStats, make_registry, render
from wsecho.serve.outbound import Dialer
from wsecho.serve.peers import PeerChannel, Routes
from wsecho.serve.sdnotify import Notifier
from wsecho.serve.takeover import ADMIN_BACKLOG, Listener
from wsecho.serve.tls import load_context, verifying_context

if TYPE_CHECKING:
    from wsecho.api.app import App
    from wsecho.api.http import Request

log = logging.getLogger(__name__)


#: How often the event-loop lag is probed, and the timer the probe sets.
LAG_INTERVAL = 1.0
LAG_PROBE = 0.01
#: How often systemd's STATUS= line is refreshed.
STATUS_INTERVAL = 10.0
#: How many of an object's tags /objects counts the sockets of (those with the most).
TAGS_SHOWN = 20


class Sweeper:
    """The one periodic callback that hibernates idle objects."""

    def __init__(self, runtime: Runtime, memory: MemoryGuard | None = None) -> None:
        # Often enough that an object hibernates within ~10% of its timeout,
        # never more than every 50 ms nor less than every second.
        interval = min(max(runtime.hibernate_after / 10, 0.05), 1.0)
        self._callback = PeriodicCallback(self._sweep, interval * 1000)
        self._runtime = runtime
        self._memory = memory

    def _sweep(self) -> None:
        try:
            self._runtime.sweep()
            if self._memory is not None:
                self._memory.check(self._runtime.clock())
        except Exception:
            log.exception("the hibernation sweep failed; it runs again at the next interval")

    def start(self) -> None:
        self._callback.start()

    def stop(self) -> None:
        self._callback.stop()


def utc_now() -> datetime:
    """The wall clock, for auto-response timestamps."""
    return datetime.now(UTC)


def backend_for(data_dir: str, storage: str = "sqlite", *, lock: bool = True) -> Backend:
    """The backend ``--storage`` names: PostgreSQL for a URL; else SQLite in ``data_dir``, or
    memory for ``:memory:`` (``lock=False`` when a supervisor holds the directory's lock)."""
    if is_postgres_url(storage):
        from wsecho.backends.postgres import PostgresBackend  # psycopg loads only when used

        return PostgresBackend(storage)
    return MemoryBackend() if data_dir == ":memory:" else SQLiteBackend(data_dir, lock=lock)


def default_leases(settings: Settings, placement: Placement | None) -> PostgresLeases:
    """This process's membership in the cluster of the processes sharing the database: named
    ``--member-name`` (default: the host name and port), ``#INDEX`` added for a worker of
    ``--workers N``; its lease owner id is unique to this process's life."""
    machine = settings.member_name or f"{socket.gethostname()}-{settings.port}"
    name = machine if placement is None or placement.count == 1 else f"{machine}#{placement.index}"
    return PostgresLeases(settings.storage, f"{name}@{secrets.token_hex(6)}", name)


def fence_with(backend: Backend, cluster: ClusterMember) -> None:
    """Every commit to PostgreSQL first checks, in its transaction, that this member still holds
    the lease of each slot it writes, at the epoch it acted under (docs/decisions/0007)."""
    from wsecho.backends.postgres import PostgresBackend, object_slot  # psycopg loads only when used

    if not isinstance(backend, PostgresBackend):
        return
    backend.idle_in_transaction = min(backend.idle_in_transaction, cluster.ttl)
    member = cluster.store.member

    def check(batches: list[Batch]) -> tuple[str, list[Any]]:
        slots = {s for s in (object_slot(b.object) for b in batches) if s is not None}
        epochs = cluster.epochs(slots)
        missing = sorted(slots - epochs.keys())
        if missing:
            msg = f"refused to commit: this process does not hold the lease of slot {missing[0]} (fenced)"
            raise FencedError(msg)
        return fence_sql(member, epochs)

    backend.fence_sql = check


def peer_address(settings: Settings, sockets: list[socket.socket]) -> str | None:
    """Where the other members reach this one's peer channel: ``--cluster-address``, else the
    application listener's address unless it listens on every interface (None: nowhere);
    ``https://`` first when the listener has TLS (docs/decisions/0013: a bare address is
    plain HTTP, as members of earlier releases read it)."""
    if settings.cluster_address:
        address = settings.cluster_address
    else:
        host, port = sockets[0].getsockname()[:2]
        if host in WILDCARD_HOSTS:
            return None
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if settings.certfile and not address.startswith(PEER_SCHEMES):
        return f"https://{address}"
    return address


def storage_label(settings: Settings) -> str:
    """Where the data is, for logs: the data directory, or the database's URL without its password."""
    return redact(settings.storage) if is_postgres_url(settings.storage) else settings.data_dir


#: Which flags set each listener's address, for the message when it cannot be bound.
LISTENER_FLAGS = {"application": ("--host", "--port"), "admin": ("--admin-host", "--admin-port")}


def bind(listener: str, host: str, port: int, **kwargs: Any) -> list[Any]:
    """Bind ``listener``'s sockets; an OSError names the listener, the address and the port."""
    try:
        return tornado.netutil.bind_sockets(port, host, **kwargs)
    except OSError as exc:
        host_flag, port_flag = LISTENER_FLAGS[listener]
        reason = (exc.strerror or str(exc)).lower()
        msg = f"the {listener} listener cannot listen on {host} port {port} ({host_flag}, {port_flag}): {reason}"
        raise OSError(msg) from exc


def start_admin(
    source: AdminSource, settings: Settings, tls: ssl.SSLContext | None
) -> tuple[Listener, list[tuple[str, int]]]:
    """Bind and start the admin listener (/healthz, /readyz, /metrics, /objects) for ``source``."""
    assert settings.admin_port is not None
    handlers: list[Any] = [
        (path, handler, {"server": source})
        for path, handler in (
            (r"/healthz", Healthz),
            (r"/readyz", Readyz),
            (r"/metrics", Metrics),
            (r"/objects", Objects),
        )
    ]
    admin_sockets = bind("admin", settings.admin_host, settings.admin_port)
    admin = tornado.web.Application(
        handlers,
        default_handler_class=NotFound,
        default_handler_args={"server": source},
        log_function=log_admin_request,
    )
    listener = Listener(admin, ssl_options=tls if settings.admin_tls else None)
    listener.configure_limits(None, max_http=0, fd_cap=None, backlog=ADMIN_BACKLOG)
    listener.add_sockets(admin_sockets)
    return listener, [s.getsockname()[:2] for s in admin_sockets]


class Server:
    """An application served on one address: the HTTP server, the runtime, the sweeper,
    and (with ``admin_port``) the admin listener."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        backend: Backend | None = None,
        notifier: Notifier | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        sweeper: bool = True,
        limits: Limits | None = None,
        placement: Placement | None = None,
        mesh: MeshClient | None = None,
        sockets: list[socket.socket] | None = None,
        leases: LeaseStore | None = None,
    ) -> None:
        """``clock`` (monotonic seconds: idle times, event timeouts) and ``wall_clock`` (alarms,
        auto-response timestamps) are the runtime's clocks. The default ``clock`` is the event
        loop's (asyncio and uvloop both read CLOCK_MONOTONIC), without the cost of finding the
        current IOLoop on every call.

        ``sweeper=False`` starts no periodic sweep, so nothing hibernates on its own: for a
        clock that moves only when its owner says so, who then calls ``runtime.sweep()``
        (``wsecho.testing`` does). ``limits`` replaces the limits built from ``settings``.

        A worker of ``--workers N`` passes its ``placement`` (the objects it owns), the
        ``mesh`` that reaches the other workers, and the listening ``sockets`` it inherited.
        A member of a cluster passes its ``leases`` (docs/decisions/0007): it then serves only
        the objects of the slots whose lease it can prove.
        """
        self.settings = settings
        if backend is None:
            backend = backend_for(settings.data_dir, settings.storage, lock=placement is None)
            if leases is None and is_postgres_url(settings.storage):
                # Several processes may share a database: each is a member of one cluster.
                leases = default_leases(settings, placement)
        self.runtime = Runtime(
            app,
            clock=clock,
            wall_clock=wall_clock,
            hibernate_after=settings.hibernate_after,
            limits=limits if limits is not None else settings.limits,
            backend=backend,
            placement=placement,
            remote=None if mesh is None else Routes(mesh, None),
            max_active_objects=settings.max_active_objects,
        )
        self.runtime.set_dialer(
            Dialer(
                self.runtime,
                connect_timeout=settings.outbound_connect_timeout,
                ca_file=settings.outbound_ca_file or None,
                max_message_size=settings.max_message_size,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
            )
        )
        #: Memory-pressure eviction (None: --memory-high off); the sweeper checks it.
        self.memory = memory_guard(
            self.runtime, settings.memory_high, settings.memory_low, settings.memory_cgroup, share=settings.workers
        )
        self.notifier = notifier if notifier is not None else Notifier(None)
        #: starting -> ready -> draining -> stopped (what /readyz reports).
        self.phase = "starting"
        self.registry = make_registry(
            self.runtime, lambda: self.loop_lag, self.listener_stats, self._loop_blocked, self.memory
        )
        #: How late the event loop last ran a timer, in seconds.
        self.loop_lag = 0.0
        #: Every open WebSocket connection (for dead-peer pings and shutdown).
        self.connections: set[Connection] = set()
        #: The Host names the admin listener answers to (the application's are the gateway's).
        self.admin_hosts = AllowedHosts.for_listener(settings.allowed_hosts, settings.admin_host)
        self._application = make_application(
            self.runtime,
            max_message_size=settings.max_message_size,
            registry=self.connections,
            max_connections=settings.max_connections,
            allowed_origins=settings.allowed_origins,
            allowed_hosts=AllowedHosts.for_listener(settings.allowed_hosts, settings.host),
            trusted_proxies=settings.forwarded_allow_ips,
            max_body_memory=settings.max_body_memory,
            max_outgoing_total=settings.max_outgoing_total,
            compression=settings.compression,
        )
        self._application.mesh = mesh
        #: When a load balancer last asked /readyz (the clock's time; start counts as one).
        self.probed_at = clock()
        #: The cluster membership and leases (None: not a cluster member).
        self.cluster: ClusterMember | None = None
        #: Calls to and from the objects of the other members (None: not a cluster member).
        self.peers: PeerChannel | None = None
        if leases is not None:
            self.cluster = ClusterMember(
                leases,
                ttl=settings.lease_ttl,
                clock=clock,
                on_lost=self.runtime.drop_slots,
                on_gained=self._slots_gained,
                probed_at=lambda: self.probed_at,
                probe_timeout=settings.lb_probe_timeout,
            )
            # The workers of this machine (--workers N) are members too; an object of a sibling
            # worker moves to it through the mesh, as without a cluster; another machine's
            # through the peer channel (docs/decisions/0012).
            self.peers = PeerChannel(
                self.runtime,
                self.cluster,
                secret=settings.cluster_secret,
                call_timeout=settings.cluster_call_timeout,
                mesh=mesh,
            )
            self._application.peers = self.peers.answer_http
            routes = Routes(mesh, self.peers)
            self.runtime.set_ownership(self.cluster, routes, guard_events=True)
            fence_with(backend, self.cluster)
            if settings.haproxy_runtime:
                routes.passed_on = self._teach_routes(settings)
        self._inherited = sockets
        self._http: Listener | None = None
        self._admin: Listener | None = None
        self._sweeper = Sweeper(self.runtime, self.memory)
        #: Reloads the application's code (``--reload-code`` on SIGHUP, ``--reload``).
        self.reloader = CodeReloader(self.runtime, settings.app)
        #: Whether the sweeper runs (``sweeper=False``: whoever moves the clock sweeps).
        self.sweeps = sweeper
        self._periodic: list[PeriodicCallback] = []
        self._background: set[asyncio.Future[Any]] = set()
        #: Warns while a handler blocks the event loop (None with --warn-blocked 0).
        self.blocked_watch = LoopWatchdog(settings.warn_blocked) if settings.warn_blocked > 0 else None
        #: The certificate both listeners serve (None: plain HTTP); SIGHUP replaces it.
        self.tls: ssl.SSLContext | None = None
        self.addresses: list[tuple[str, int]] = []
        self.admin_addresses: list[tuple[str, int]] = []

    async def start(self) -> list[tuple[str, int]]:
        """Open storage, bind and start serving; return the bound ``(host, port)`` pairs."""
        settings = self.settings
        if settings.certfile or settings.keyfile:
            # Before anything binds: a bad file is a start-up error naming it.
            check_tls(settings.certfile, settings.keyfile, settings.admin_tls)
            self.tls = load_context(settings.certfile, settings.keyfile)
        if settings.cluster_ca_file or self.peers is not None:
            peer_tls = verifying_context("--cluster-ca-file", settings.cluster_ca_file)
            if self.peers is not None:
                self.peers.client.tls = peer_tls
        if self.settings.admin_port is not None:
            # The admin listener comes up first, so /readyz can say "starting".
            self._admin, self.admin_addresses = start_admin(self, settings, self.tls)
        await self.runtime.start()
        # Bound before the cluster starts, so that its heartbeat can advertise the address
        # (nothing is accepted before the listener starts below).
        sockets = self._inherited or bind(
            "application", self.settings.host, self.settings.port, backlog=self.settings.backlog
        )
        if self.cluster is not None:
            if self.cluster.store.address is None:
                self.cluster.store.address = peer_address(settings, sockets)
            await self.cluster.start()
            # Ready (to systemd, to a supervisor) once it holds its share, not before: bounded,
            # after which /readyz keeps saying what it waits for.
            if not await self.cluster.wait_settled(2 * self.cluster.ttl):
                log.warning("not yet holding every slot it should: %s", self.cluster.status())
        self._http = Listener(
            self._application,
            max_body_size=max(self.settings.max_message_size, 64 * 1024),
            max_header_size=MAX_HEADER_BYTES,
            # Tornado's header timeout: a client that dribbles its request is cut (slowloris).
            idle_connection_timeout=self.settings.handshake_timeout,
            body_timeout=BODY_TIMEOUT,
            ssl_options=self.tls,
        )
        self._http.configure_limits(
            self._application,
            max_http=self.settings.max_http_connections,
            fd_cap=self._fd_cap(),
            backlog=self.settings.backlog,
        )
        self._http.add_sockets(sockets)
        self.addresses = [s.getsockname()[:2] for s in sockets]
        if self.sweeps:
            self._sweeper.start()
        self._start_periodic(self._measure_lag, LAG_INTERVAL)
        if self.settings.ping_interval > 0:
            self._start_periodic(self._ping_peers, min(max(self.settings.ping_interval / 4, 0.05), 5.0))
        self._start_periodic(self._report_status, STATUS_INTERVAL)
        if self.settings.reload:
            self.reloader.watch()  # the files' state at start
            self._start_periodic(self.reloader.watch, WATCH_INTERVAL)
        if self.notifier.watchdog_interval is not None:
            # From the event loop itself: a stuck loop stops the pings and systemd restarts us.
            self._start_periodic(self._watchdog, self.notifier.watchdog_interval)
        if self.blocked_watch is not None:
            self.blocked_watch.start()
        self.phase = "ready"
        self.notifier.ready()
        self._report_status()
        return self.addresses

    def _fd_cap(self) -> int | None:
        """The most connections that fit under RLIMIT_NOFILE with a reserve; warn if the limits do not."""
        limit = open_file_limit()
        if limit is None:
            return None
        reserve = min(MAX_RESERVED_FDS, limit // 8)
        cap = max(limit - descriptors_in_use() - reserve, 1)
        settings = self.settings
        wanted = settings.max_connections + settings.max_http_connections
        log.debug("at most %d connections fit under the open-file limit of %d", cap, limit)
        if not settings.max_connections or not settings.max_http_connections or wanted > cap:
            shown = wanted if settings.max_connections and settings.max_http_connections else "unlimited"
            log.warning(
                "--max-connections %d plus --max-http-connections %d (%s connections) do not fit under "
                "the open-file limit (ulimit -n) of %d with %d descriptors for storage and reserve: at most %d "
                "connections at once, the rest are closed at accept; raise the limit (LimitNOFILE= "
                "under systemd) or lower the options",
                settings.max_connections,
                settings.max_http_connections,
                shown,
                limit,
                limit - cap,
                cap,
            )
        return cap

    def listener_stats(self) -> ListenerStats:
        """What /metrics reports about the listener."""
        gateway = self._application
        listeners = [x for x in (self._http, self._admin) if x is not None]
        return ListenerStats(
            http_connections=self._http.http_open if self._http is not None else 0,
            body_bytes=gateway.body_bytes,
            accept_pauses=sum(x.accept_pauses for x in listeners),
            refused=dict(gateway.refused),
            handed_over=gateway.handed_over,
            adopted=gateway.adopted,
        )

    def _loop_blocked(self) -> int:
        return 0 if self.blocked_watch is None else self.blocked_watch.episodes

    def _watchdog(self) -> None:
        self.notifier.watchdog()

    def _start_periodic(self, fn: Callable[[], None], seconds: float) -> None:
        callback = PeriodicCallback(fn, seconds * 1000)
        callback.start()
        self._periodic.append(callback)

    def _ping_peers(self, now: float | None = None) -> None:
        """Find dead peers: ping each every --ping-interval; cut those that do not answer within
        --ping-timeout, and those whose send queue has not drained a byte for --ping-timeout.

        Only a Pong carrying our Ping's payload counts (``Connection.heard``): a peer that sends
        but never reads cannot pass by sending unsolicited Pongs or messages. A peer cut here is
        gone as if its network died: ``web_socket_close(1006)``, counted in ``dead_peers``.
        One pass over the open connections instead of one timer per socket.
        """
        if now is None:
            now = asyncio.get_running_loop().time()
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        dead = stalled = 0
        for conn in list(self.connections):
            if conn.backlog is not None:
                continue  # we stopped reading it ourselves (its object is busy): its Pong waits unread
            if conn.backed_up:
                conn.look(0)
                if conn.drained > 0 or conn.stalled_since is None:  # progress, or the first look
                    conn.drained = 0
                    conn.stalled_since = now
                elif now - conn.stalled_since > timeout:
                    conn.abort()
                    stalled += 1
                    continue
            if conn.heard:  # the Pong to our Ping came since the last pass
                conn.heard = False
                conn.last_seen = now
                conn.ping_sent_at = None
            elif conn.ping_sent_at is not None:
                if now - conn.ping_sent_at > timeout:
                    conn.abort()
                    dead += 1
            elif now - conn.last_seen > interval:
                conn.ping(now)
        if dead or stalled:
            self.runtime.stats.dead_peers += dead + stalled
            log.info(
                "cut %s that did not answer a ping within %gs and %s whose send queue did not drain for %gs",
                counted(dead, "WebSocket peer"),
                timeout,
                counted(stalled, "peer"),
                timeout,
            )

    def _measure_lag(self) -> None:
        loop = IOLoop.current()
        expected = loop.time() + LAG_PROBE

        def probe() -> None:
            self.loop_lag = max(loop.time() - expected, 0.0)

        loop.call_later(LAG_PROBE, probe)

    def status_line(self) -> str:
        states = Counter(h.lifecycle.state.value for h in self.runtime.hosts())
        return (
            f"{self.phase}: {counted(self.runtime.socket_count(), 'WebSocket')}; "
            f"objects: {states['active']} active, {states['hibernating']} hibernating"
        )

    def _report_status(self) -> None:
        self.notifier.status(self.status_line())

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def admin_port(self) -> int:
        return self.admin_addresses[0][1]

    def _teach_routes(self, settings: Settings) -> Callable[[Request, str], None]:
        """A request for another member's object teaches HAProxy that member (docs/decisions/0007):
        one refused (a WebSocket, or any request without ``--cluster-secret``), and one passed on
        to that member (the returned function, for :class:`Routes`)."""
        cluster = self.cluster
        assert cluster is not None
        route = RouteKey.parse(settings.route_key)
        teacher = Teacher([a.strip() for a in settings.haproxy_runtime.split(",") if a.strip()], settings.haproxy_map)
        me = cluster.store.name

        def misrouted(request: Request, hex_id: str) -> None:
            key, owner = route.value(request), cluster.expected_owner(hex_id)
            if key is None or owner is None or owner == me:
                return
            machine = machine_of(owner)
            if machine != cluster.machine:  # a sibling worker's object moves through the mesh instead
                teacher.teach(key, machine, self.runtime.clock())

        self._application.misrouted = misrouted
        return misrouted

    def _slots_gained(self, slots: Collection[int]) -> None:
        task = asyncio.ensure_future(self.runtime.load_alarms(slots))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def adopt(self, sock: socket.socket, meta: dict[str, Any]) -> None:
        """Serve a connection another worker handed over (``--workers``)."""
        await self._application.adopt(sock, meta)

    async def answer_peer(self, message: Any) -> Any:
        """Another worker of this machine received a peer call for this worker's object (``--workers``)."""
        if self.peers is None:
            return {"not_owner": "this worker is not a member of a cluster"}
        return await self.peers.answer_mesh(message)

    async def readiness(self) -> Readiness:
        self.probed_at = self.runtime.clock()
        readiness = readiness_of(self.phase, self.runtime.storage_failure())
        if readiness.ready and self.cluster is not None and not self.cluster.ready():
            return Readiness(False, f"cluster: {self.cluster.status()}", expected=self.cluster.last_error is None)
        if readiness.ready and self.reloader.failure is not None:
            # Still ready: the previous code serves every object (decision 0009).
            return Readiness(True, f"ready; {self.reloader.failure}")
        return readiness

    async def metrics_page(self) -> bytes:
        return render(self.registry)

    async def objects_page(self, limit: int, state: ObjectState | None) -> dict[str, Any]:
        return self.describe_objects(limit, state)

    def describe_objects(self, limit: int, state: ObjectState | None) -> dict[str, Any]:
        """What /objects shows: each object's id, class, state, sockets (and how many have each
        of its ``TAGS_SHOWN`` biggest tags), idle time and blocker.

        Only ``limit`` objects are described; the others are only counted.
        """
        now = self.runtime.clock()
        hosts = self.runtime.hosts()
        selected = iter(hosts) if state is None else (h for h in hosts if h.lifecycle.state is state)
        listed = []
        for host in itertools.islice(selected, limit):
            lc = host.lifecycle
            in_memory = lc.state is not ObjectState.HIBERNATING
            blocker = self.runtime.hibernation_blocker(host) if in_memory else None
            awake_until = host.awake_until
            listed.append(
                {
                    "id": host.id.hex,
                    "name": host.id.name,
                    "namespace": host.id.namespace,
                    "class": host.cls.__name__,
                    "state": lc.state.value,
                    "sockets": len(host.sockets),
                    "hibernatable_sockets": host.hibernatable_count,
                    "tags": host.tag_counts(TAGS_SHOWN),
                    "distinct_tags": len(host.tagged),
                    "idle_seconds": None if lc.idle_since is None else round(now - lc.idle_since, 3),
                    "hibernate_after": host.hibernate_after,
                    "cannot_hibernate_because": blocker,
                    # Whether --max-active-objects or memory pressure may hibernate it now (None:
                    # not in memory); one kept awake goes only after every other idle one.
                    "evictable": None if not in_memory else blocker is None,
                    "kept_awake_for": None if awake_until is None else round(awake_until - now, 3),
                }
            )
        count = len(hosts) if state is None else len(listed) + sum(1 for _ in selected)
        return {"count": count, "shown": len(listed), "objects": listed}

    def apply(self, settings: Settings) -> list[str]:
        """Apply the reloadable settings (SIGHUP); return the changed ones that need a restart."""
        reloadable = RELOADABLE if self.tls is not None and settings.certfile else RELOADABLE - TLS_FILES
        changes = {name: getattr(settings, name) for name in reloadable}
        ignored = [
            name
            for name in attrs.fields_dict(Settings)
            if name not in reloadable and getattr(settings, name) != getattr(self.settings, name)
        ]
        if self.tls is not None and settings.certfile and not self._reload_tls(settings):
            changes.pop("certfile")
            changes.pop("keyfile")
        self.settings = attrs.evolve(self.settings, **changes)
        self.runtime.set_hibernate_after(settings.hibernate_after)
        self._sweeper.stop()
        self._sweeper = Sweeper(self.runtime, self.memory)
        if self.phase == "ready" and self.sweeps:
            self._sweeper.start()
        return ignored

    def _reload_tls(self, settings: Settings) -> bool:
        """Read the certificate and key again (SIGHUP): new handshakes get them, open
        connections keep their session. A bad file keeps the old ones and logs why."""
        try:
            check_tls(settings.certfile, settings.keyfile, settings.admin_tls)
            context = load_context(settings.certfile, settings.keyfile)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the current certificate: %s", exc)
            return False
        self.tls = context
        # Tornado wraps each accepted socket with the listener's ssl_options (a public attribute).
        for listener in (self._http, self._admin if self.settings.admin_tls else None):
            if listener is not None:
                listener.ssl_options = context
        log.info("SIGHUP: certificate re-read from %s", settings.certfile)
        return True

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close every WebSocket with 1001, wait (bounded) for the peers, cut
        those that did not answer, commit every pending write and close storage."""
        self.phase = "draining"
        self.notifier.stopping()
        self._report_status()
        if timeout is None:
            timeout = self.settings.drain_timeout
        if self._http is not None:
            self._http.stop()
        await self.reloader.wait()  # a reload under way holds events: let it deliver them
        self._sweeper.stop()
        self.runtime.close_all(1001, "Going Away")
        deadline = IOLoop.current().time() + timeout
        while self.runtime.socket_count() and IOLoop.current().time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()  # a peer that did not answer the Close within the drain timeout
        if self.connections:
            # abort() has the loop call connection_lost soon, which forgets the connection:
            # let it run (on Python 3.12 and 3.13 nothing below yields before stop() returns).
            await asyncio.sleep(0)
        if self._http is not None:
            await self._http.close_all_connections()
        await self.runtime.close()
        if self.peers is not None:
            self.peers.close()
        if self.cluster is not None:
            await self.cluster.drain()  # after the last commit: the others take the slots at once
            await self.cluster.close()
        for callback in self._periodic:
            callback.stop()
        self._periodic.clear()
        if self.blocked_watch is not None:
            self.blocked_watch.stop()
        if self._admin is not None:
            self._admin.stop()
            await self._admin.close_all_connections()
        self.phase = "stopped"
