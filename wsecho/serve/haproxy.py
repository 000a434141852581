"""Routing a cluster with HAProxy (docs/decisions/0007): the configuration it runs, and how a
member teaches it where a routing key's object lives.

HAProxy cannot compute an object's slot: the application's ``fetch`` picks the object. So it
routes by a *routing key* taken from the request (a path segment, a query parameter or a
header: the same expression here and in HAProxy), first by an ``owners`` map, then by a
consistent hash. A member that receives a request for an object another member serves
answers 503 with ``Retry-After`` and adds the key to the map through HAProxy's runtime API,
so the client's next attempt, and every later request with that key, goes to the owner.

``wsecho haproxy-config`` prints the configuration for a list of members.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import sys
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlsplit

import attrs

from wsecho.api.http import Request
from wsecho.core.errors import ConfigError
from wsecho.serve.config import OneLineParser

log = logging.getLogger("wsecho.haproxy")

#: Names HAProxy accepts for backends and servers, and keys the runtime API takes as one word.
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_KEY = re.compile(r"[\x21-\x7e]{1,256}")
#: How many routing keys a member remembers having taught, and how soon it may teach one again.
TAUGHT_KEYS = 10_000
TEACH_INTERVAL = 0.5


@attrs.frozen
class RouteKey:
    """``path:N`` (the Nth path segment), ``query:NAME`` or ``header:NAME``."""

    kind: str
    arg: str

    @classmethod
    def parse(cls, text: str) -> RouteKey:
        kind, _, arg = text.partition(":")
        if kind == "path" and arg.isdigit() and 1 <= int(arg) <= 32:
            return cls(kind, arg)
        if kind in ("query", "header") and _NAME.fullmatch(arg):
            return cls(kind, arg)
        msg = f"must be path:N (1 to 32), query:NAME or header:NAME, got {text!r}"
        raise ValueError(msg)

    def haproxy(self) -> str:
        """The same key as an HAProxy sample expression."""
        if self.kind == "path":
            return f"path,field({int(self.arg) + 1},/)"  # the path starts with "/": field 1 is empty
        if self.kind == "query":
            return f"url_param({self.arg})"
        return f"req.hdr({self.arg})"

    def value(self, request: Request) -> str | None:
        """The key of ``request`` as HAProxy sees it (raw, not percent-decoded), or None."""
        url = urlsplit(request.url)
        if self.kind == "path":
            parts = url.path.split("/")
            found = parts[int(self.arg)] if int(self.arg) < len(parts) else ""
        elif self.kind == "query":
            found = next((v for k, v in parse_qsl(url.query, keep_blank_values=True) if k == self.arg), "")
        else:
            found = request.headers.get(self.arg) or ""
        return found if _KEY.fullmatch(found) else None


def backend_name(member: str) -> str:
    return f"wsecho_{member}"


@attrs.frozen
class Member:
    name: str
    host: str
    port: int
    admin_port: int

    @classmethod
    def parse(cls, text: str) -> Member:
        """``NAME=HOST:PORT:ADMIN_PORT``."""
        name, _, where = text.partition("=")
        host, _, ports = where.rpartition(":")
        host, _, port = host.rpartition(":")
        if not (_NAME.fullmatch(name) and host and port.isdigit() and ports.isdigit()):
            msg = f"a member is NAME=HOST:PORT:ADMIN_PORT, got {text!r}"
            raise ValueError(msg)
        return cls(name, host.strip("[]"), int(port), int(ports))


def haproxy_config(
    members: Sequence[Member],
    *,
    bind: str,
    route: RouteKey,
    runtime_api: str,
    map_path: str,
) -> str:
    """The HAProxy configuration for ``members``: a map of learned owners, else a consistent hash."""
    servers = []
    for m in members:
        host = f"[{m.host}]" if ":" in m.host else m.host
        servers.append(f"    server {m.name} {host}:{m.port} check port {m.admin_port}")
    lines = [
        "# Written by `wsecho haproxy-config`; the map file must exist (it may be empty).",
        "global",
        f"    stats socket {runtime_api} level admin",
        "",
        "defaults",
        "    mode http",
        "    option forwardfor",
        "    timeout connect 5s",
        "    timeout client  30s",
        "    timeout server  30s",
        "    # A WebSocket, once upgraded: above --ping-interval (30 s).",
        "    timeout tunnel  75s",
        "    # Only a member that holds its slots says ready (/readyz on its admin port). A member",
        "    # marked down has its sessions cut, so that its clients reconnect (to the new owner)",
        "    # instead of waiting on a process that stopped.",
        "    option httpchk GET /readyz",
        "    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions",
        "",
        "frontend wsecho",
        f"    bind {bind}",
        f"    http-request set-var(txn.route) {route.haproxy()}",
        f"    use_backend %[var(txn.route),map({map_path},wsecho_hash)]",
        "",
        "backend wsecho_hash",
        "    balance hash var(txn.route)",
        "    hash-type consistent",
        *servers,
    ]
    for m, server in zip(members, servers, strict=True):
        # When the member is down, another one answers (503, and it teaches the map the
        # key's new owner): without the backups, a key mapped to a dead member stays dead.
        backups = [f"{s} backup" for other, s in zip(members, servers, strict=True) if other is not m]
        lines += ["", f"backend {backend_name(m.name)}", server, *backups]
    return "\n".join(lines) + "\n"


class Teacher:
    """Tells every HAProxy (its runtime API) which member serves a routing key."""

    def __init__(self, addresses: Sequence[str], map_path: str) -> None:
        self.addresses = list(addresses)
        self.map_path = map_path
        self._taught: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def teach(self, key: str, member: str, now: float) -> None:
        """Map ``key`` to ``member``'s backend in every HAProxy (in the background).

        The map is shared by every member, so another one may have changed the key since this
        one taught it: a request that still arrives here is taught again, at most once per
        :data:`TEACH_INTERVAL` seconds per key.
        """
        backend = backend_name(member)
        last = self._taught.get(key)
        if last is not None and last[0] == backend and now - last[1] < TEACH_INTERVAL:
            return
        self._taught[key] = (backend, now)
        self._taught.move_to_end(key)
        while len(self._taught) > TAUGHT_KEYS:
            self._taught.popitem(last=False)
        for address in self.addresses:
            task = asyncio.ensure_future(self._send(address, key, backend))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, address: str, key: str, backend: str) -> None:
        command = f"del map {self.map_path} {key};add map {self.map_path} {key} {backend}\n"
        try:
            answer = await asyncio.wait_for(runtime_api(address, command), 5)
        except (OSError, TimeoutError) as exc:
            self._taught.pop(key, None)
            log.warning("cannot teach HAProxy at %s that %s is served by %s: %s", address, key, backend, exc)
            return
        if "unknown map" in answer.lower():
            log.error("HAProxy at %s has no map %s (--haproxy-map): %s", address, self.map_path, answer.strip())


async def runtime_api(address: str, command: str) -> str:
    """Send one command line to HAProxy's runtime API (``HOST:PORT`` or a Unix socket path)."""
    if address.startswith("/"):
        reader, writer = await asyncio.open_unix_connection(address)
    else:
        host, _, port = address.removeprefix("ipv4@").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(command.encode())
        await writer.drain()
        return (await reader.read()).decode(errors="replace")
    finally:
        writer.close()


def main(argv: Sequence[str]) -> int:
    """``wsecho haproxy-config``: print the HAProxy configuration for a cluster."""
    parser = OneLineParser(
        prog="wsecho haproxy-config",
        description="Print an HAProxy configuration that routes a wsecho cluster (docs/scaling-out.md).",
    )
    parser.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="NAME=HOST:PORT:ADMIN_PORT",
        help="a member: its --member-name, address, port and admin port (repeat for each)",
    )
    parser.add_argument("--bind", default=":80", help="where HAProxy listens (default :80)")
    parser.add_argument("--route-key", required=True, help="path:N, query:NAME or header:NAME (as the members')")
    parser.add_argument(
        "--runtime-api", default="ipv4@127.0.0.1:9999", help="HAProxy's runtime API (the members' --haproxy-runtime)"
    )
    parser.add_argument(
        "--map", default="/etc/haproxy/wsecho-owners.map", help="the owners map file (the members' --haproxy-map)"
    )
    args = parser.parse_args(argv)
    try:
        members = [Member.parse(text) for text in args.member]
        route = RouteKey.parse(args.route_key)
    except ValueError as exc:
        raise ConfigError("haproxy-config", str(exc)) from None
    sys.stdout.write(
        haproxy_config(members, bind=args.bind, route=route, runtime_api=args.runtime_api, map_path=args.map)
    )
    return 0
