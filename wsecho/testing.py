"""Testing your own objects with pytest: an application served in-process, and a handle on its runtime.

This module owns the test harness. :func:`serve_app` serves a :class:`~wsecho.App` on a free
port of 127.0.0.1 and yields a :class:`Harness`, which connects real WebSocket clients, makes
time pass without sleeping (:class:`FakeClock` drives both of the runtime's clocks), forces
hibernation, and shows each object's state, constructor runs and storage::

    import pytest

    from rooms import app  # the README's tutorial
    from wsecho.testing import receive, serve_app


    @pytest.mark.gen_test  # pytest-tornado; any asyncio test runner works
    async def test_a_hibernated_room_still_delivers_messages():
        async with serve_app(app) as t:
            ann = await t.connect("/rooms/kitchen/websocket")
            bob = await t.connect("/rooms/kitchen/websocket")
            t.hibernate("ROOMS", "kitchen")
            assert t.state("ROOMS", "kitchen") == "hibernating"
            await ann.send("hello")
            assert await receive(bob) == "hello"
            assert t.constructions("ROOMS", "kitchen") == 2  # it woke up for the message

The harness is a :class:`~wsecho.serve.server.Server` (``t.server``), started and stopped as
``python -m wsecho`` starts and stops one, with two differences that make time the test's: its
clocks are a :class:`FakeClock`, and it runs no periodic sweep (``Server(sweeper=False)``) nor
dead-peer pings, so idle objects hibernate only when the test calls :meth:`Harness.advance`,
:meth:`Harness.hibernate` or :meth:`Harness.hibernate_all`.

``websockets`` (a test dependency of wsecho, not a dependency) is imported only by
:meth:`Harness.connect`; without it that method raises ``ModuleNotFoundError`` saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import tornado.httpclient

from wsecho.api.http import Response
from wsecho.api.storage import DurableObjectStorage
from wsecho.core.errors import InvalidArgumentError, InvalidStateError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.wording import counted
from wsecho.runtime.host import ObjectHost
from wsecho.runtime.runtime import Runtime
from wsecho.serve.config import Settings
from wsecho.serve.server import Server

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from wsecho.api.app import App
    from wsecho.api.objects import DurableObjectNamespace
    from wsecho.core.limits import Limits

__all__ = ["FakeClock", "Harness", "StorageView", "receive", "receive_json", "serve_app"]

#: Where a :class:`FakeClock` starts unless told otherwise: a fixed instant, so tests repeat.
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
#: How long the harness waits for anything (a client to connect, an object to settle).
DEFAULT_TIMEOUT = 5.0
#: How long :func:`serve_app` gives open WebSockets to close when the test is over.
CLOSE_TIMEOUT = 2.0


class FakeClock:
    """The runtime's two clocks, which move only when a test says so.

    ``monotonic`` is the runtime's ``clock`` (idle times, event timeouts), ``now`` its
    ``wall_clock`` (alarms, auto-response timestamps). Objects that need the time should get
    it from ``env`` (a var), so that a test can hand them ``clock.time``::

        clock = FakeClock()
        app = App(fetch=fetch, bindings={"ROOMS": Room}, vars={"CLOCK": clock.time})
        clock.advance(60)  # one minute later, on both clocks
        clock.time()  # 1767225660.0
    """

    def __init__(self, start: datetime = DEFAULT_START, monotonic: float = 1000.0) -> None:
        if start.tzinfo is None:
            msg = f"FakeClock(start=...) needs an aware datetime (with tzinfo), got {start!r}"
            raise InvalidArgumentError(msg)
        self._wall = start
        self._monotonic = monotonic

    def __repr__(self) -> str:
        return f"<FakeClock {self._wall.isoformat()}>"

    def monotonic(self) -> float:
        """Seconds on the runtime's monotonic scale (``Runtime(clock=...)``)."""
        return self._monotonic

    def now(self) -> datetime:
        """The wall clock as an aware UTC datetime (``Runtime(wall_clock=...)``)."""
        return self._wall

    def time(self) -> float:
        """The wall clock in epoch seconds, like ``time.time()``: ``clock.time() == 1767225600.0``."""
        return self._wall.timestamp()

    def advance(self, seconds: float) -> None:
        """Move both clocks ``seconds`` forward; nothing runs (see :meth:`Harness.advance`).

        ``clock.advance(2.5)``
        """
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not math.isfinite(seconds):
            msg = f"advance() takes a finite number of seconds, got {seconds!r}"
            raise InvalidArgumentError(msg)
        if seconds < 0:
            msg = f"advance() cannot move time backwards, got {seconds} seconds"
            raise InvalidArgumentError(msg)
        self._monotonic += seconds
        self._wall += timedelta(seconds=seconds)


class StorageView:
    """Read-only access to one object's storage from a test: ``await t.storage("ROOMS", "kitchen").get("k")``.

    Reads see what the object sees: its committed writes and, while it is in memory, the
    writes of a turn that is still committing. It never wakes the object.
    """

    def __init__(self, harness: Harness, binding: str, name: str) -> None:
        self._harness = harness
        self._binding = binding
        self._name = name

    def __repr__(self) -> str:
        return f"<StorageView {self._binding} {self._name!r}>"

    @contextlib.contextmanager
    def _storage(self) -> Iterator[DurableObjectStorage]:
        runtime = self._harness.runtime
        host = self._harness.host(self._binding, self._name)
        if host is not None and host.storage is not None:
            yield host.storage  # the object's own ctx.storage, uncommitted writes included
            return
        # The object has no storage in memory, so nothing of it is uncommitted: a storage that
        # no host keeps reads exactly what is stored, and changes nothing in the runtime.
        ns = self._harness.namespace(self._binding)
        detached = ObjectHost(ns.id_from_name(self._name), ns.object_class, runtime, runtime.hibernate_after)
        storage = detached.open_storage()
        try:
            yield storage
        finally:
            storage.close()  # a SQL-storage object's database, opened for this read

    async def get(self, key: str | Iterable[str]) -> Any:
        """The value of ``key`` (None if absent), or a dict of the found keys of a list.

        ``await t.storage("ROOMS", "kitchen").get("meta")  # {"seq": 3, "at": ...}``
        """
        with self._storage() as storage:
            return await storage.get(key)

    async def list(self, **options: Any) -> dict[str, Any]:
        """Like ``ctx.storage.list(prefix=, start=, end=, limit=, reverse=)``.

        ``await t.storage("ROOMS", "kitchen").list(prefix="msg:", limit=10)``
        """
        with self._storage() as storage:
            return await storage.list(**options)

    async def snapshot(self, prefix: str | None = None) -> dict[str, Any]:
        """Every key and value (those under ``prefix``), in key order.

        ``assert await t.storage("COUNTERS", "a").snapshot() == {"count": 3}``
        """
        with self._storage() as storage:
            return await storage.list(prefix=prefix)

    async def get_alarm(self) -> int | None:
        """When the object's alarm goes off, in epoch milliseconds, or None.

        ``assert await t.storage("ROOMS", "kitchen").get_alarm() is None``
        """
        with self._storage() as storage:
            return await storage.get_alarm()


class Harness:
    """A served application, as :func:`serve_app` yields it.

    ``server`` is the :class:`~wsecho.serve.server.Server`, ``runtime`` its
    :class:`~wsecho.runtime.runtime.Runtime`, ``clock`` their :class:`FakeClock`, ``port`` the
    port on 127.0.0.1. Objects are named by their binding and their name, as in
    ``env.ROOMS.get_by_name("kitchen")``: ``t.state("ROOMS", "kitchen")``.
    """

    def __init__(self, server: Server, clock: FakeClock) -> None:
        self.server = server
        self.clock = clock
        self._clients: list[ClientConnection] = []

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    @property
    def port(self) -> int:
        return self.server.port

    def __repr__(self) -> str:
        return f"<Harness http://127.0.0.1:{self.port}>"

    # -- talking to the application ----------------------------------------------------------

    def url(self, path: str = "/", scheme: str = "http") -> str:
        """The URL of ``path`` on this server: ``t.url("/rooms/kitchen", "ws")``."""
        if not path.startswith("/"):
            msg = f"url() takes a path that starts with '/', got {path!r}"
            raise InvalidArgumentError(msg)
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def connect(self, path: str, *, timeout: float = DEFAULT_TIMEOUT, **options: Any) -> ClientConnection:
        """A connected client of the ``websockets`` library; closed at the end of ``serve_app``.

        ``options`` go to ``websockets.asyncio.client.connect`` (``additional_headers``,
        ``subprotocols``, ...)::

            ws = await t.connect("/rooms/kitchen/websocket?name=ann")
            await ws.send("hello")
            reply = await receive(ws)
        """
        connect = _websockets_connect()
        client: ClientConnection = await connect(self.url(path, "ws"), open_timeout=timeout, **options)
        self._clients.append(client)
        return client

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Response:
        """An HTTP request over the network to this server; its answer as a :class:`~wsecho.Response`.

        ``page = await t.fetch("/"); assert page.status == 200``
        """
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        try:
            answer = await client.fetch(
                self.url(path),
                method=method,
                headers=headers,
                body=body,
                raise_error=False,
                request_timeout=timeout,
                follow_redirects=False,
                allow_nonstandard_methods=True,
            )
        finally:
            client.close()
        if answer.code == 599:  # Tornado's code for "no answer"
            msg = f"{method} {path}: {answer.error}"
            raise ConnectionError(msg)
        return Response(answer.body, answer.code, list(answer.headers.get_all()))

    # -- looking at objects --------------------------------------------------------------------

    def namespace(self, binding: str) -> DurableObjectNamespace:
        """The namespace of ``binding`` (``env.ROOMS`` for ``"ROOMS"``)."""
        ns = self.runtime.namespaces.get(binding)
        if ns is None:
            known = ", ".join(sorted(self.runtime.namespaces)) or "none"
            msg = f"the application has no binding {binding!r} (its bindings: {known})"
            raise InvalidArgumentError(msg)
        return ns

    def host(self, binding: str, name: str) -> ObjectHost | None:
        """The runtime's host of the object, or None if the runtime holds nothing for it.

        ``t.host("ROOMS", "kitchen").sockets`` are the object's server-side sockets.
        """
        return self.runtime.find(self.namespace(binding).name, name)

    def state(self, binding: str, name: str) -> str | None:
        """``"active"``, ``"hibernating"`` or ``"waking"``; None when the runtime holds nothing
        for the object (never used, or hibernated with no sockets left).

        ``assert t.state("ROOMS", "kitchen") == "hibernating"``
        """
        host = self.host(binding, name)
        return None if host is None else host.lifecycle.state.value

    def constructions(self, binding: str, name: str) -> int:
        """How many times the object's constructor ran: 1 after its first event, one more per wake.

        It counts from 0 again after the runtime forgot the object (see :meth:`state`)::

            before = t.constructions("ROOMS", "kitchen")
            t.hibernate("ROOMS", "kitchen")
            await ws.send("wake up")
            ...
            assert t.constructions("ROOMS", "kitchen") == before + 1
        """
        host = self.host(binding, name)
        return 0 if host is None else host.constructions

    def storage(self, binding: str, name: str) -> StorageView:
        """The object's storage, read-only: ``await t.storage("ROOMS", "kitchen").snapshot()``."""
        self.namespace(binding)
        return StorageView(self, binding, name)

    # -- moving the runtime ----------------------------------------------------------------------

    def hibernate(self, binding: str, name: str) -> None:
        """Hibernate the object now, as its idle timeout would: the instance goes, the sockets stay.

        An object that is not in memory is left as it is. One that is busy cannot hibernate
        (an event is being handled or queued, ``wait_until`` work, a non-hibernatable
        socket, writes being committed): that raises ``InvalidStateError`` naming the
        reason; ``await t.settle()`` first waits for handlers and commits to finish::

            t.hibernate("ROOMS", "kitchen")
            assert t.state("ROOMS", "kitchen") == "hibernating"
        """
        host = self.host(binding, name)
        if host is None or host.lifecycle.state is ObjectState.HIBERNATING:
            return
        blocker = host.lifecycle.hibernation_blocker()
        if blocker is not None:
            msg = f"{binding} {name!r} cannot hibernate now: {blocker}"
            raise InvalidStateError(msg)
        self._evict(host)

    def hibernate_all(self) -> int:
        """Hibernate every object in memory at once; return how many hibernated.

        If any of them is busy, nothing hibernates and ``InvalidStateError`` names each one
        and its reason::

            assert t.hibernate_all() == 2
        """
        hosts = [h for h in self.runtime.hosts() if h.lifecycle.state is not ObjectState.HIBERNATING]
        blocked = [(h, h.lifecycle.hibernation_blocker()) for h in hosts]
        reasons = [f"{h.id.namespace} {h.id.name or h.id.hex!r}: {why}" for h, why in blocked if why is not None]
        if reasons:
            msg = f"{counted(len(reasons), 'object')} cannot hibernate now: {'; '.join(reasons)}"
            raise InvalidStateError(msg)
        if not hosts:
            return 0
        # The runtime's own eviction: at this instant every idle object is past its timeout.
        now = self.runtime.clock() + max(h.hibernate_after for h in hosts)
        evicted = self.runtime.sweep(now=now)
        for host in hosts:
            if host.lifecycle.state is ObjectState.ACTIVE:
                self._evict(host)  # an object whose idle time the sweep did not track yet
                evicted += 1
        return evicted

    def _evict(self, host: ObjectHost) -> None:
        # sweep() hibernates every due object; this is its step for one object, with the
        # same bookkeeping, so that a test can hibernate exactly the object it names.
        self.runtime.hibernate(host)

    async def advance(self, seconds: float, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Let ``seconds`` pass at once: objects idle for their ``hibernate_after`` hibernate,
        due alarms run, and this returns once their handlers are done (at most ``timeout``).

        ::

            await t.advance(10)  # the default idle time: the room hibernates
            assert t.state("ROOMS", "kitchen") == "hibernating"
            await t.advance(24 * 3600)  # a day later: the room's alarm has run
        """
        self.clock.advance(seconds)
        self.runtime.sweep()
        self.runtime.fire_due_alarms()
        await self.settle(timeout=timeout)

    async def settle(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait (at most ``timeout`` seconds) until no object has an event being handled or
        queued, ``wait_until`` work or writes being committed.

        ``await ws.send(...); await t.settle()`` is how a test waits for a message it gets
        no answer to.
        """
        busy: list[ObjectHost] = []
        try:
            async with asyncio.timeout(timeout):
                while busy := [h for h in self.runtime.hosts() if h.busy()]:
                    await asyncio.gather(*(self._barrier(h) for h in busy), return_exceptions=True)
        except TimeoutError:
            still = [f"{h.id.namespace} {h.id.name!r}: {h.lifecycle.hibernation_blocker()}" for h in busy]
            msg = f"objects still busy after {timeout} s: {'; '.join(still)}"
            raise TimeoutError(msg) from None

    async def _barrier(self, host: ObjectHost) -> None:
        # An empty turn queued behind everything the object has to do: the runtime delivers
        # events in order, so once it has run, every earlier event has (commit included).
        await self.runtime.barrier(host)
        if host.background:
            await asyncio.gather(*host.background, return_exceptions=True)

    # -- ending ------------------------------------------------------------------------------------

    async def _close_clients(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*(_close(c) for c in self._clients), return_exceptions=True)
        # A client still open did not get its Close answered: release its socket.
        left = [c for c in self._clients if c.close_code is None]
        for client in left:
            client.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*(c.wait_closed() for c in left), return_exceptions=True)


async def _close(client: ClientConnection) -> None:
    # A client with max_queue (16) messages unread has stopped reading its socket, so it would
    # never see the server's answer to its Close: read (and drop) what is left while closing.
    reader = asyncio.ensure_future(_drain(client))
    try:
        await client.close()
    finally:
        reader.cancel()


async def _drain(client: ClientConnection) -> None:
    with contextlib.suppress(Exception):  # closed, or a recv() the test left waiting
        async for _ in client:
            pass


def _websockets_connect() -> Callable[..., Any]:
    try:
        from websockets.asyncio.client import connect
    except ImportError as exc:
        msg = (
            "Harness.connect() needs the websockets package, a test dependency of wsecho: "
            "pip install 'websockets>=13' (or pip install 'wsecho[test]')"
        )
        raise ModuleNotFoundError(msg, name="websockets") from exc
    return connect


@contextlib.asynccontextmanager
async def serve_app(
    app: App,
    *,
    clock: FakeClock | None = None,
    hibernate_after: float = 10.0,
    data_dir: str | os.PathLike[str] = ":memory:",
    max_message_size: int = 1024 * 1024,
    limits: Limits | None = None,
) -> AsyncIterator[Harness]:
    """Serve ``app`` on a free port of 127.0.0.1 for the ``async with`` block; yield a :class:`Harness`.

    The settings are the server's (``hibernate_after``, ``max_message_size``, ``data_dir``:
    ``":memory:"`` or a directory for SQLite, such as pytest's ``tmp_path``). Time is
    ``clock`` (a new :class:`FakeClock` by default); nothing hibernates until the test moves
    it. At the end the clients of :meth:`Harness.connect` are closed, then the server stops as
    ``Server.stop()`` does: every other WebSocket gets Close 1001, pending writes are
    committed and storage is closed::

        async with serve_app(app, hibernate_after=30, data_dir=tmp_path) as t:
            ws = await t.connect("/rooms/kitchen/websocket")
    """
    clock = clock if clock is not None else FakeClock()
    settings = Settings(
        host="127.0.0.1",
        port=0,
        hibernate_after=hibernate_after,
        max_message_size=max_message_size,
        data_dir=os.fspath(data_dir),
        # Any Host, as an application without a listener of its own: a test may send its own.
        allowed_hosts=("*",),
        # Dead peers are found on the event loop's real time; a test's peers are its own.
        ping_interval=0,
        drain_timeout=CLOSE_TIMEOUT,
    )
    server = Server(app, settings, clock=clock.monotonic, wall_clock=clock.now, sweeper=False, limits=limits)
    try:
        await server.start()
        harness = Harness(server, clock)
        try:
            yield harness
        finally:
            await harness._close_clients()
    finally:
        await server.stop()


async def receive(ws: ClientConnection, timeout: float = DEFAULT_TIMEOUT) -> str | bytes:
    """The next message of a client, waiting at most ``timeout`` seconds (then ``TimeoutError``).

    ``assert await receive(ws) == "pong"``
    """
    async with asyncio.timeout(timeout):
        return await ws.recv()


async def receive_json(ws: ClientConnection, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """The next message of a client, decoded from JSON, waiting at most ``timeout`` seconds.

    ``assert (await receive_json(ws))["type"] == "history"``
    """
    message = await receive(ws, timeout)
    return json.loads(message)
