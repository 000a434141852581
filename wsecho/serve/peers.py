"""The peer channel (docs/decisions/0012): RPC and ``fetch`` between objects on different
members of a cluster.

A member answers calls from the others on its own application listener, under
``/.wsecho/call`` and ``/.wsecho/fetch``, and only when the request is signed with the
cluster's shared secret (``--cluster-secret``): an HMAC-SHA256 of the path and the body,
checked in constant time. Anything else there gets 403 (logged, at most once a minute).
A member whose listener has TLS (``--certfile``) advertises ``https://HOST:PORT`` and is called
over TLS, its certificate checked against ``--cluster-ca-file`` (docs/decisions/0013); a bare
``HOST:PORT`` is called over plain HTTP.

The caller finds the member that holds the object's slot lease in the lease table (cached
per slot), and sends it the same payload a worker sends another worker over the mesh
(:func:`wsecho.serve.mesh.object_handlers` answers both). The owner runs it only if it can
prove the lease, as for its own events; otherwise it answers "not owner" and the caller
reads the lease table again and retries, for at most :attr:`PeerChannel.bound` seconds
(long enough for a dead owner's slots to move), then raises ``NotOwnerError``. A call that
was sent and got no answer within ``--cluster-call-timeout`` is not retried (it may have run).

Values cross in the storage codec (:mod:`wsecho.api.codec`), never pickled: a peer's answer
is data, and an exception comes back as its class's name and message, rebuilt only from a
class already loaded here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from wsecho.api import codec
from wsecho.api.http import Request, Response
from wsecho.core.errors import InvalidArgumentError, NotOwnerError
from wsecho.core.placement import slot_of
from wsecho.serve.acceptor import RateLimitedWarning
from wsecho.serve.config import split_peer_address
from wsecho.serve.mesh import CLIENT_REQUEST, MAX_MESSAGE, MeshClient, encode_values, object_handlers, request_state

if TYPE_CHECKING:
    from wsecho.api.ids import DurableObjectId
    from wsecho.backends.leases import SlotOwner
    from wsecho.runtime.cluster import ClusterMember
    from wsecho.runtime.runtime import Owner, Runtime

log = logging.getLogger("wsecho.peers")

#: The paths of the peer channel on the application listener (reserved on a cluster member).
PREFIX = "/.wsecho/"
PATHS = {"/.wsecho/call": "call", "/.wsecho/fetch": "fetch"}
SIGNATURE = "X-Wsecho-Signature"
#: How long opening a connection to another member may take.
CONNECT_TIMEOUT = 2.0
#: Idle connections kept open to each member, for the next calls.
IDLE_PER_MEMBER = 8
#: Members whose TLS failures are rate-limited apart; past it the oldest is forgotten.
TLS_WARNED_MEMBERS = 256
#: OpenSSL's reasons when the other end does not speak TLS at all.
NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})

#: What the gateway calls for a request under :data:`PREFIX`: (path, headers, body, client
#: address) -> (status, body).
PeerHandler = Callable[[str, Any, bytes, str], Awaitable[tuple[int, bytes]]]


class Unreachable(Exception):  # noqa: N818 - internal: "the call was not delivered"
    """The call did not reach the member (nothing was sent, or the connection was closed
    before it was read): safe to send again."""


class TLSFailure(Exception):  # noqa: N818 - internal: "the member cannot be called as configured"
    """TLS to the member failed in a way another attempt would not change (its certificate
    does not verify, or one end does not speak TLS): not retried."""


def is_object_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def sign(secret: bytes, path: str, body: bytes) -> str:
    return hmac.new(secret, path.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def error_state(exc: BaseException) -> list[str]:
    return [type(exc).__module__, type(exc).__qualname__, str(exc)]


def error_from(state: list[str]) -> Exception:
    """The callee's exception as the same class when that class is loaded here and takes a
    message, else a RuntimeError naming it (nothing is imported on a peer's say-so)."""
    module, qualname, message = state
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Exception):
        try:
            exc: Exception = found(message)
        except Exception:  # noqa: BLE001 - a constructor that wants more: the fallback below
            pass
        else:
            return exc
    return RuntimeError(f"{qualname}: {message}")


class PeerClient:
    """HTTP/1.1 POSTs to other members over persistent connections (a few idle ones kept per
    member): one call on a connection at a time, every wait bounded."""

    def __init__(
        self,
        secret: bytes,
        call_timeout: float,
        connect_timeout: float = CONNECT_TIMEOUT,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.secret = secret
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        #: Checks the certificates of members called over TLS (None: the system's CAs, on first use).
        self.tls = tls
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def post(self, address: str, path: str, body: bytes) -> tuple[int, bytes]:
        """Raises :class:`Unreachable` (not delivered), :class:`TLSFailure`, TimeoutError (no
        answer within the call timeout: it may have run), ConnectionError (the connection
        failed mid-answer)."""
        idle = self._idle.get(address)
        while idle:
            reader, writer = idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            try:
                return await self._exchange(address, reader, writer, path, body)
            except Unreachable:
                continue  # the member closed this idle connection before it read the call
        reader, writer = await self._open(address)
        try:
            return await self._exchange(address, reader, writer, path, body)
        except Unreachable as exc:
            # A new connection that closes unanswered: the member may have run the call and died,
            # or it has TLS and dropped a plain call (OpenSSL answers one with no alert).
            if not address.startswith("https://"):
                hint = f"a TLS listener drops a plain HTTP call so: with --certfile its address is https://{address}"
                raise ConnectionError(f"{exc} ({hint})") from None
            raise ConnectionError(str(exc)) from None

    async def _open(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            tls, host, port = split_peer_address(address)
        except ValueError as exc:
            msg = f"its advertised address {exc}"
            raise Unreachable(msg) from None
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE)
        except TimeoutError:
            msg = f"no connection within {self.connect_timeout:g}s"
            raise Unreachable(msg) from None
        except OSError as exc:
            raise Unreachable(exc.strerror or str(exc)) from None
        if tls:
            try:
                await self._start_tls(writer, host)
            except BaseException:
                writer.close()
                raise
        return reader, writer

    async def _start_tls(self, writer: asyncio.StreamWriter, host: str) -> None:
        """The TLS handshake on a new connection, checking the member's certificate and that it
        names ``host`` (an IP address against its IP SANs)."""
        if self.tls is None:
            self.tls = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await writer.start_tls(self.tls, server_hostname=host)
        except TimeoutError:
            # A plain HTTP listener waits for a request line and never answers the handshake.
            msg = f"no TLS handshake within {self.connect_timeout:g}s (is its listener plain HTTP, without --certfile?)"
            raise Unreachable(msg) from None
        except ssl.SSLCertVerificationError as exc:
            msg = f"its certificate does not verify: {exc.verify_message or exc.reason} (--cluster-ca-file)"
            raise TLSFailure(msg) from None
        except ssl.SSLError as exc:
            if exc.reason in NOT_TLS:
                msg = f"it does not speak TLS ({exc.reason}): its listener is plain HTTP, without --certfile"
            else:
                msg = f"the TLS handshake failed: {exc.reason or exc}"
            raise TLSFailure(msg) from None
        except OSError as exc:
            msg = f"the TLS handshake failed: {exc.strerror or exc or type(exc).__name__}"
            raise Unreachable(msg) from None

    async def _exchange(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n{SIGNATURE}: {sign(self.secret, path, body)}\r\n\r\n"
        )
        keep = False
        try:
            async with asyncio.timeout(self.call_timeout):
                try:
                    writer.write(head.encode() + body)
                    status_line = await reader.readline()
                except (ConnectionError, OSError) as exc:
                    raise Unreachable(exc.strerror or str(exc)) from None
                if not status_line:
                    msg = "the connection closed before the call was answered"
                    raise Unreachable(msg)
                status = int(status_line.split()[1])
                length, close = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                    elif name.strip().lower() == "connection" and "close" in value.lower():
                        close = True
                if length > MAX_MESSAGE:
                    msg = f"an answer of {length} bytes is over the limit of {MAX_MESSAGE}"
                    raise ConnectionError(msg)
                data = await reader.readexactly(length)
            keep = not close
            return status, data
        except (asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            msg = f"a malformed or cut answer: {exc}"
            raise ConnectionError(msg) from None
        finally:
            pool = self._idle.setdefault(address, [])
            if keep and len(pool) < IDLE_PER_MEMBER:
                pool.append((reader, writer))
            else:
                writer.close()

    def close(self) -> None:
        for pool in self._idle.values():
            for _, writer in pool:
                writer.close()
        self._idle.clear()


class _CalleeError(Exception):
    """The callee raised: its exception (rebuilt here), carried out of the retry loop."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class PeerChannel:
    """A cluster member's calls to objects other members serve, and its answers to theirs."""

    def __init__(
        self,
        runtime: Runtime,
        cluster: ClusterMember,
        *,
        secret: str,
        call_timeout: float,
        mesh: MeshClient | None = None,
    ) -> None:
        self.runtime = runtime
        self.cluster = cluster
        self.secret = secret.encode() if secret else None
        self.client = PeerClient(self.secret or b"", call_timeout)
        self.mesh = mesh
        self._handlers = object_handlers(runtime)
        #: Slot -> its owner as last read from the lease table (at most one entry per slot).
        self._owners: dict[int, SlotOwner] = {}
        self._refused = RateLimitedWarning(log)
        #: Member name -> its TLS failures' warning (at most :data:`TLS_WARNED_MEMBERS`).
        self._tls_warnings: dict[str, RateLimitedWarning] = {}

    @property
    def bound(self) -> float:
        """How long a call looks for a member that can serve it: a dead member's heartbeat
        counts for 1.5 ttl, its successor takes the slot on its next round (a third of one)."""
        return 2 * self.cluster.ttl + self.client.connect_timeout

    # -- the caller's side (through Routes) -------------------------------------------------

    async def send(self, expected: str, id: DurableObjectId, op: str, payload: list[Any]) -> Any:  # noqa: A002
        """Run ``op`` (``fetch`` or ``call``, the mesh's payload) on the member that holds
        ``id``'s lease (``expected``: the member that should, for messages); its answer."""
        calls = self.runtime.stats.peer_calls
        try:
            answer = await self._send(expected, id, op, payload)
        except _CalleeError as exc:
            calls["out", "error"] += 1
            raise exc.error from None
        except NotOwnerError:
            calls["out", "failed"] += 1
            raise
        calls["out", "ok"] += 1
        return answer

    async def _send(self, expected: str, id: DurableObjectId, op: str, payload: list[Any]) -> Any:  # noqa: A002
        slot = slot_of(id.hex)
        if self.secret is None:
            msg = (
                f"{id!r} (slot {slot}) is served by another member of the cluster ({expected}); calls between "
                "members need the same --cluster-secret on every member (docs/scaling-out.md)"
            )
            raise NotOwnerError(msg, id.hex)
        body = codec.encode(payload)
        path = f"{PREFIX}{op}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound
        delay = 0.02
        while True:
            if self.cluster.is_local(id.hex):  # the slot moved here meanwhile
                return await self._handlers[op](payload)
            why, answer = await self._try(id, slot, path, body)
            if answer is not None:
                return answer[0]
            if loop.time() + delay > deadline:
                msg = f"{id!r} (slot {slot}): no member could serve it within {self.bound:g}s: {why}"
                raise NotOwnerError(msg, id.hex)
            self.runtime.stats.peer_calls["out", "retry"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _try(self, id: DurableObjectId, slot: int, path: str, body: bytes) -> tuple[str, tuple[Any] | None]:  # noqa: A002
        """One attempt: (why it failed, None), or ("", (the answer,)); raises what must not be retried."""
        owner = self._owners.get(slot)
        if owner is None:
            try:
                async with asyncio.timeout(self.cluster.store.statement_timeout * 2):
                    owner = await self.cluster.store.locate(slot)
            except Exception as exc:  # noqa: BLE001 - an outage of the lease table: retried
                return f"the lease table cannot be read: {exc or type(exc).__name__}", None
            if owner is None:
                return "no member holds its lease now (it is moving)", None
            if owner.member == self.cluster.store.member:
                return "this member has just taken its lease and cannot prove it yet", None
            if owner.address is None:
                return f"member {owner.name}, which holds its lease, advertises no --cluster-address", None
            self._owners[slot] = owner
        try:
            status, data = await self.client.post(owner.address or "", path, body)
        except Unreachable as exc:
            self._owners.pop(slot, None)
            return f"member {owner.name} at {owner.address} cannot be reached: {exc}", None
        except TLSFailure as exc:
            self._owners.pop(slot, None)
            self._tls_warning(owner.name).warn(
                "cannot call member %s at %s over the peer channel: %s", owner.name, owner.address, exc
            )
            msg = f"{id!r} (slot {slot}): member {owner.name} at {owner.address} cannot be called: {exc}"
            raise NotOwnerError(msg, id.hex) from None
        except TimeoutError:
            self._owners.pop(slot, None)
            msg = (
                f"{id!r} (slot {slot}): member {owner.name} at {owner.address}, which holds its lease, did not "
                f"answer within {self.client.call_timeout:g}s (--cluster-call-timeout)"
            )
            raise NotOwnerError(msg, id.hex) from None
        except (ConnectionError, OSError) as exc:
            self._owners.pop(slot, None)
            msg = f"{id!r} (slot {slot}): the call to member {owner.name} at {owner.address} failed: {exc}"
            raise NotOwnerError(msg, id.hex) from None
        if status == 403:
            msg = (
                f"{id!r} (slot {slot}): member {owner.name} at {owner.address} refused the call: "
                f"{data.decode(errors='replace')}"
            )
            raise NotOwnerError(msg, id.hex)
        if status != 200:
            msg = f"{id!r} (slot {slot}): member {owner.name} at {owner.address} answered {status}"
            raise NotOwnerError(msg, id.hex)
        answer = codec.decode(data)
        if "not_owner" in answer:
            self._owners.pop(slot, None)
            return f"member {owner.name}: {answer['not_owner']}", None
        if "error" in answer:
            raise _CalleeError(error_from(answer["error"]))
        return "", (answer["ok"],)

    def _tls_warning(self, member: str) -> RateLimitedWarning:
        warning = self._tls_warnings.pop(member, None)
        if warning is None:
            warning = RateLimitedWarning(log)
            if len(self._tls_warnings) >= TLS_WARNED_MEMBERS:
                del self._tls_warnings[next(iter(self._tls_warnings))]
        self._tls_warnings[member] = warning  # the most recent last
        return warning

    # -- the callee's side ------------------------------------------------------------------

    async def answer_http(self, path: str, headers: Any, body: bytes, client: str) -> tuple[int, bytes]:
        """A request under :data:`PREFIX` on the application listener (the gateway's hook)."""
        status, answer = await self._answer_http(path, headers, body, client)
        if status != 200:
            self.runtime.stats.peer_calls["in", "refused"] += 1
        return status, answer

    async def _answer_http(self, path: str, headers: Any, body: bytes, client: str) -> tuple[int, bytes]:
        op = PATHS.get(path)
        if self.secret is None:
            self._refused.warn("refused a call from %s to %s: this member has no --cluster-secret", client, path)
            return 403, b"this member takes no calls from other members: it has no --cluster-secret"
        given = (headers.get(SIGNATURE) or "").encode("ascii", "replace")
        if not hmac.compare_digest(given, sign(self.secret, path, body).encode()):
            how = "a wrong" if given else "no"
            self._refused.warn(
                "refused a call from %s to %s: %s signature (not our --cluster-secret)", client, path, how
            )
            return 403, b"refused: the call is not signed with this cluster's --cluster-secret"
        if op is None:
            return 404, f"no peer call at {path}".encode()
        try:
            payload = codec.decode(body)
        except (InvalidArgumentError, ValueError) as exc:
            return 400, f"a malformed call: {exc}".encode()
        if not (isinstance(payload, list) and len(payload) >= 4 and is_object_id(payload[1])):
            return 400, b"a malformed call: not [namespace, id, name, ...]"
        answer = await self.answer([op, payload])
        self.runtime.stats.peer_calls["in", next(iter(answer))] += 1  # ok, error or not_owner
        return 200, codec.encode(answer)

    async def answer(self, message: Any, *, forwarded: bool = False) -> dict[str, Any]:
        """Run ``[op, payload]`` on an object this member can prove the lease of; a sibling
        worker's (``--workers N``) goes on to it through the mesh, once."""
        op, payload = message
        hex_id = payload[1]
        if not self.cluster.is_local(hex_id):
            sibling = self.cluster.owner(hex_id)
            if isinstance(sibling, int) and self.mesh is not None and not forwarded:
                try:
                    answer: dict[str, Any] = await self.mesh.call(sibling, "peer", message)
                except Exception as exc:  # noqa: BLE001 - the caller raises it
                    return {"error": error_state(exc)}
                return answer
            return {"not_owner": f"{self.cluster.store.name} cannot prove the lease of slot {slot_of(hex_id)}"}
        try:
            return {"ok": await self._handlers[op](payload)}
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            return {"error": error_state(exc)}

    async def answer_mesh(self, message: Any) -> dict[str, Any]:
        """A call another worker of this machine received for this worker's object."""
        return await self.answer(message, forwarded=True)

    def close(self) -> None:
        self.client.close()


class Routes:
    """The runtime's :class:`~wsecho.runtime.runtime.Remote`: a sibling worker's objects
    (``--workers N``) through the mesh, another member's through the peer channel."""

    def __init__(self, mesh: MeshClient | None, peers: PeerChannel | None) -> None:
        self.mesh = mesh
        self.peers = peers
        #: Called with a client's request that another member answered, and the object's id
        #: (the server teaches HAProxy that member for the request's routing key).
        self.passed_on: Callable[[Request, str], None] | None = None

    async def fetch_object(self, owner: Owner, id: DurableObjectId, request: Request) -> Response:  # noqa: A002
        if isinstance(owner, int):
            assert self.mesh is not None
            return await self.mesh.fetch_object(owner, id, request)
        assert self.peers is not None
        if "websocket" in (request.headers.get("Upgrade") or "").lower():
            # The load balancer routes a WebSocket to its owner (and learns it from this
            # refusal); a member does not carry one for another.
            msg = (
                f"{id!r} (slot {slot_of(id.hex)}) is served by another member of the cluster ({owner}), "
                "which the load balancer routes its WebSockets to"
            )
            raise NotOwnerError(msg, id.hex)
        payload = [id.namespace, id.hex, id.name, list(request_state(request))]
        status, headers, body = await self.peers.send(owner, id, "fetch", payload)
        if self.passed_on is not None and CLIENT_REQUEST.get() is request:
            # The client's own request, passed on whole: its next ones can go straight there.
            self.passed_on(request, id.hex)
        return Response(body, status=status, headers=headers)

    async def call_object(
        self,
        owner: Owner,
        id: DurableObjectId,  # noqa: A002 - Cloudflare's name
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if isinstance(owner, int):
            assert self.mesh is not None
            return await self.mesh.call_object(owner, id, method, args, kwargs)
        assert self.peers is not None
        values = encode_values([list(args), kwargs], f"an argument of {method}()", "the member that owns the object")
        return codec.decode(await self.peers.send(owner, id, "call", [id.namespace, id.hex, id.name, method, values]))
