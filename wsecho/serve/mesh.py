"""The workers' mesh (``--workers N``): requests and RPC calls between workers, and the
hand-over of a client's connection to the worker that owns its object.

Each worker listens in the supervisor's private directory (mode 0700) on two Unix sockets:

- ``w<i>.sock`` (stream): calls from the other workers and the supervisor — an object's
  ``fetch`` or RPC method, and the admin endpoints' ``metrics``, ``objects`` and
  ``readiness``. A message is a 4-byte length and a pickle; only processes of the same
  server (the same user, through the private directory) can connect.
- ``w<i>.hand`` (datagrams): a client connection handed over with ``SCM_RIGHTS``, with the
  request the accepting worker read and the bytes it read past it.

RPC arguments and results cross as :mod:`wsecho.api.codec` values (what storage takes:
JSON-like values and bytes), so a call to an object in another worker behaves the same
whatever its values are; a value the codec cannot carry is an ``InvalidArgumentError``
naming it, raised in the caller.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsecho.api import codec
from wsecho.api.http import Request, Response
from wsecho.api.ids import DurableObjectId
from wsecho.core.errors import InvalidArgumentError

if TYPE_CHECKING:
    from wsecho.runtime.runtime import Runtime

log = logging.getLogger("wsecho.mesh")

_LENGTH = struct.Struct("!I")
#: The largest message between workers (a request or response body, a /metrics page).
MAX_MESSAGE = 64 * 1024 * 1024
#: The largest hand-over datagram: the request's head and body and the bytes read past it.
MAX_HAND_OVER = 192 * 1024
#: How long a call or a hand-over waits for a worker that is not there (being restarted).
OWNER_WAIT = 10.0

#: The variables the supervisor hands a worker (and which the worker removes from its environment).
ENV_INDEX = "WSECHO_WORKER_INDEX"
ENV_COUNT = "WSECHO_WORKER_COUNT"
ENV_LISTEN_FDS = "WSECHO_WORKER_LISTEN_FDS"
ENV_CONTROL_FD = "WSECHO_WORKER_CONTROL_FD"
ENV_MESH_DIR = "WSECHO_WORKER_MESH_DIR"
ENV_SUPERVISOR = "WSECHO_WORKER_SUPERVISOR_PID"
WORKER_ENV = (ENV_INDEX, ENV_COUNT, ENV_LISTEN_FDS, ENV_CONTROL_FD, ENV_MESH_DIR, ENV_SUPERVISOR)

#: Set by the gateway while the application's ``fetch`` runs for a WebSocket upgrade: a stub
#: ``fetch`` of that request to another worker's object moves the connection there.
UPGRADING: contextvars.ContextVar[bool] = contextvars.ContextVar("wsecho_upgrading", default=False)
#: Set by the gateway while the application's ``fetch`` runs: the client's request, so that
#: passing it on to another member can teach the load balancer that member.
CLIENT_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("wsecho_client_request", default=None)
#: Set while a handed-over request runs again in its owner: the worker it came from.
HANDED_OVER_FROM: contextvars.ContextVar[int | None] = contextvars.ContextVar("wsecho_handed_over", default=None)


class HandOver(BaseException):
    """Raised through the application's ``fetch`` when it routes a WebSocket upgrade to an
    object another worker owns: the gateway hands the connection over to that worker.

    A BaseException so that an application's ``except Exception`` does not swallow it.
    """

    def __init__(self, owner: int) -> None:
        super().__init__(owner)
        self.owner = owner


class RoutingError(Exception):
    """A handed-over request was routed to yet another worker's object: the application's
    ``fetch`` does not pick the object from the request alone."""


class WorkerUnavailableError(Exception):
    """The worker that owns the object did not answer within :data:`OWNER_WAIT` seconds."""

    def __init__(self, owner: int, why: str) -> None:
        super().__init__(
            f"worker {owner}, which owns this object, is not answering ({why}); it is being restarted, try again"
        )
        self.owner = owner


def read_control(sock: socket.socket) -> bytes | None:
    """What the other end of a supervisor-worker control socket sent (call when it is readable):
    None if nothing after all, ``b""`` once that end closed — the loop then stops watching it."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(sock.fileno())
    return data


def stream_path(directory: Path, index: int) -> Path:
    return directory / f"w{index}.sock"


def hand_path(directory: Path, index: int) -> Path:
    return directory / f"w{index}.hand"


def encode_values(values: Any, what: str, where: str = "the worker that owns the object") -> bytes:
    """``values`` in the storage codec; an InvalidArgumentError names ``what`` could not be sent ``where``."""
    try:
        return codec.encode(values)
    except InvalidArgumentError as exc:
        msg = f"{what} cannot be sent to {where}: {exc}"
        raise InvalidArgumentError(msg) from None


def request_state(request: Request) -> tuple[str, str, list[tuple[str, str]], bytes]:
    return request.url, request.method, list(request.headers.items()), request.body


def request_from(state: tuple[str, str, list[tuple[str, str]], bytes]) -> Request:
    url, method, headers, body = state
    return Request(url, method=method, headers=headers, body=body)


def response_state(response: Response) -> tuple[int, list[tuple[str, str]], bytes]:
    if response.web_socket is not None:
        msg = "a 101 response to a fetch() from another worker cannot carry a WebSocket across processes"
        raise InvalidArgumentError(msg)
    return response.status, list(response.headers.items()), response.body or b""


def _error_state(exc: BaseException) -> Any:
    """The exception as the caller will see it: itself if it pickles, else a RuntimeError naming it."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - whatever stops it pickling, the caller gets a RuntimeError
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return data


def object_handlers(runtime: Runtime) -> Handlers:
    """``fetch`` and ``call`` of an object this process serves, for a caller in another process
    (a worker over the mesh, a cluster member over the peer channel): the payloads are what
    :class:`MeshClient` sends, the answers what it decodes."""

    def object_of(namespace: str, hex_id: str, name: str | None) -> tuple[Any, DurableObjectId]:
        binding = runtime.namespaces[namespace]
        return binding.object_class, DurableObjectId(namespace, hex_id, name)

    async def fetch(payload: Any) -> Any:
        namespace, hex_id, name, state = payload
        cls, oid = object_of(namespace, hex_id, name)
        return response_state(await runtime.fetch_object(cls, oid, request_from(state)))

    async def call(payload: Any) -> Any:
        namespace, hex_id, name, method, values = payload
        cls, oid = object_of(namespace, hex_id, name)
        args, kwargs = codec.decode(values)
        result = await runtime.call_object(cls, oid, method, tuple(args), kwargs)
        return encode_values(result, f"the result of {method}()")

    return {"fetch": fetch, "call": call}


#: What a worker does with a handed-over connection and the request read from it.
Adopt = Callable[[socket.socket, dict[str, Any]], Awaitable[None]]
#: ``op -> handler(payload)``: what a worker answers on its stream socket.
Handlers = dict[str, Callable[[Any], Awaitable[Any]]]


class _Peer:
    """One stream connection to a worker: calls are numbered, answers matched by number."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        self.reader = reader
        self.writer = writer
        self.index = index
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        why = "the connection to it closed"
        try:
            while True:
                call_id, ok, payload = pickle.loads(await _read_message(self.reader))
                future = self.pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(payload)
                else:
                    future.set_exception(pickle.loads(payload))
        except (ConnectionError, OSError) as exc:
            why = f"the connection to it failed: {exc}"
        except asyncio.IncompleteReadError:
            pass
        finally:
            self.writer.close()
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(WorkerUnavailableError(self.index, why))
            self.pending.clear()

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def call(self, op: str, payload: Any) -> Any:
        call_id = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        data = pickle.dumps((call_id, op, payload))
        self.writer.write(_LENGTH.pack(len(data)) + data)
        return await future


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > MAX_MESSAGE:
        msg = f"a mesh message of {size} bytes is over the limit of {MAX_MESSAGE}"
        raise ConnectionError(msg)
    return await reader.readexactly(size)


class MeshClient:
    """Calls into the workers: for a worker (its :class:`~wsecho.runtime.runtime.Remote`) and
    for the supervisor (the admin endpoints)."""

    def __init__(self, directory: Path, index: int | None, owner_wait: float = OWNER_WAIT) -> None:
        """``index``: the calling worker's (None: the supervisor)."""
        self.directory = directory
        self.index = index
        self.owner_wait = owner_wait
        self._peers: dict[int, _Peer] = {}
        self._connecting: dict[int, asyncio.Future[_Peer]] = {}
        self._hand_sock: socket.socket | None = None

    async def _peer(self, index: int, wait: float) -> _Peer:
        peer = self._peers.get(index)
        if peer is not None and peer.alive:
            return peer
        pending = self._connecting.get(index)
        if pending is None:
            pending = self._connecting[index] = asyncio.ensure_future(self._connect(index, wait))
            pending.add_done_callback(lambda _: self._connecting.pop(index, None))
        return await asyncio.shield(pending)

    async def _connect(self, index: int, wait: float) -> _Peer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.01
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(stream_path(self.directory, index)))
            except OSError as exc:
                if loop.time() + delay > deadline:
                    raise WorkerUnavailableError(index, exc.strerror or str(exc)) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            peer = self._peers[index] = _Peer(reader, writer, index)
            return peer

    async def call(self, index: int, op: str, payload: Any, wait: float | None = None) -> Any:
        peer = await self._peer(index, self.owner_wait if wait is None else wait)
        return await peer.call(op, payload)

    # -- Remote (the runtime's view) ---------------------------------------------------

    async def fetch_object(self, owner: int, id: DurableObjectId, request: Request) -> Response:  # noqa: A002
        if UPGRADING.get() and "websocket" in (request.headers.get("Upgrade") or "").lower():
            if HANDED_OVER_FROM.get() is not None:
                msg = (
                    f"fetch() routed a WebSocket upgrade that another worker handed over to an object of "
                    f"worker {owner}: with --workers, fetch() must pick the object from the request alone "
                    "(no randomness, no per-process state)"
                )
                raise RoutingError(msg)
            raise HandOver(owner)
        status, headers, body = await self.call(owner, "fetch", (id.namespace, id.hex, id.name, request_state(request)))
        return Response(body, status=status, headers=headers)

    async def call_object(
        self,
        owner: int,
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        what = f"an argument of {method}()"
        payload = (id.namespace, id.hex, id.name, method, encode_values([list(args), kwargs], what))
        return codec.decode(await self.call(owner, "call", payload))

    # -- hand-over ------------------------------------------------------------------------

    async def hand_over(self, owner: int, sock: socket.socket, meta: dict[str, Any]) -> None:
        """Send the client's connection ``sock`` and what was read from it to worker ``owner``.

        Raises :class:`WorkerUnavailableError` when the owner is not there within the wait
        (the caller still holds ``sock`` and answers the client), InvalidArgumentError when
        the request is too large to hand over.
        """
        data = pickle.dumps(meta)
        if len(data) > MAX_HAND_OVER:
            msg = (
                f"the upgrade request is {len(data)} bytes with its body; "
                f"at most {MAX_HAND_OVER} can move to another worker"
            )
            raise InvalidArgumentError(msg)
        if self._hand_sock is None:
            self._hand_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._hand_sock.setblocking(False)
            with contextlib.suppress(OSError):
                self._hand_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_HAND_OVER)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.owner_wait
        delay = 0.005
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))]
        while True:
            try:
                self._hand_sock.sendmsg([data], rights, 0, str(hand_path(self.directory, owner)))
                return
            except (BlockingIOError, FileNotFoundError, ConnectionRefusedError) as exc:
                # The owner's queue is full, or the owner is being restarted.
                if loop.time() + delay > deadline:
                    raise WorkerUnavailableError(owner, exc.strerror or type(exc).__name__) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)

    def close(self) -> None:
        for peer in self._peers.values():
            peer.task.cancel()
            peer.writer.close()
        self._peers.clear()
        if self._hand_sock is not None:
            self._hand_sock.close()
            self._hand_sock = None


class MeshServer:
    """A worker's side of the mesh: answers calls and adopts handed-over connections."""

    def __init__(self, directory: Path, index: int) -> None:
        self.directory = directory
        self.index = index
        self._server: asyncio.AbstractServer | None = None
        self._hand: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, handlers: Handlers, adopt: Adopt) -> None:
        path = stream_path(self.directory, self.index)
        hand = hand_path(self.directory, self.index)
        for stale in (path, hand):  # left by this index's previous process, if it was killed
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(str(hand))
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_HAND_OVER)
        self._hand = sock
        self._handlers = handlers
        self._adopt = adopt
        asyncio.get_running_loop().add_reader(sock.fileno(), self._receive)
        self._server = await asyncio.start_unix_server(self._serve, str(path))

    def _receive(self) -> None:
        assert self._hand is not None
        while True:
            try:
                data, ancillary, flags, _ = self._hand.recvmsg(MAX_HAND_OVER, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("receiving a handed-over connection failed: %s", exc)
                return
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if len(fds) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                log.error("dropped a malformed hand-over (%d descriptors, flags %#x)", len(fds), flags)
                continue
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            meta = pickle.loads(data)
            task = asyncio.ensure_future(self._adopt(sock, meta))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                call_id, op, payload = pickle.loads(await _read_message(reader))
                task = asyncio.ensure_future(self._answer(writer, call_id, op, payload))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The loop is shutting down with this caller still connected: nothing to answer.
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, call_id: int, op: str, payload: Any) -> None:
        try:
            result = await self._handlers[op](payload)
            data = pickle.dumps((call_id, True, result))
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            data = pickle.dumps((call_id, False, _error_state(exc)))
        if not writer.is_closing():
            writer.write(_LENGTH.pack(len(data)) + data)

    async def close(self) -> None:
        if self._hand is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._hand.fileno())
            self._hand.close()
            self._hand = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
