"""The admin listener's endpoints: /healthz, /readyz, /metrics, /objects."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.tcpserver
import tornado.web

from wsecho.core.errors import BadRequestError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.target import resolve
from wsecho.serve.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from wsecho.core.target import AllowedHosts


class AdminSource(Protocol):
    """What the admin endpoints read (the Server, or the supervisor of ``--workers``, which
    asks every worker; passed in, not imported)."""

    admin_hosts: AllowedHosts

    async def readiness(self) -> Readiness: ...

    async def metrics_page(self) -> bytes: ...

    async def objects_page(self, limit: int, state: ObjectState | None) -> dict[str, Any]: ...


@attrs.frozen
class Readiness:
    """What /readyz answers: 200 ``ready``, or 503 and why; ``expected`` (starting, draining)
    is logged at INFO, since a load balancer's probe sees it at every deploy."""

    ready: bool
    text: str
    expected: bool = False


def readiness_of(phase: str, storage_failure: str | None) -> Readiness:
    """One process's readiness: its phase, and whether its storage writes fail."""
    if phase == "ready" and storage_failure is not None:
        # Writes fail (a full disk, an I/O error): new work would only be reset with 1011.
        return Readiness(False, f"storage failing: {storage_failure}")
    return Readiness(phase == "ready", phase, expected=phase != "ready")


log = logging.getLogger(__name__)


#: The most objects one /objects answer lists (?limit=), so that one request's work is bounded.
MAX_OBJECTS_LISTED = 10_000


access_log = logging.getLogger("tornado.access")


def log_admin_request(handler: tornado.web.RequestHandler) -> None:
    """The admin listener's access log line: Tornado's (``log_function``), at the level the
    handler chose (:attr:`AdminHandler.access_log_level`), else by status as Tornado does."""
    status = handler.get_status()
    level = handler.access_log_level if isinstance(handler, AdminHandler) else None
    if level is None:
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    request = handler.request
    elapsed_ms = 1000.0 * request.request_time()
    access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, request.uri, request.remote_ip, elapsed_ms)


class AdminHandler(tornado.web.RequestHandler):
    """Base of the admin endpoints: no caching, no Server header."""

    server: AdminSource
    #: The level of this request's access log line; None: by status (5xx at ERROR).
    access_log_level: int | None = None

    def initialize(self, server: AdminSource) -> None:
        self.server = server

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        # The same Host rules as the application's port: a DNS-rebound page must not read
        # /metrics or /objects from a browser on this machine.
        request = self.request
        fields = request.headers.get_list("Host")
        try:
            resolve(
                request.method or "GET",
                request.uri or "/",
                request.version,
                fields,
                self.server.admin_hosts,
                request.host,
            )
        except BadRequestError as exc:
            self.text(exc.status, str(exc))

    def compute_etag(self) -> str | None:
        return None

    def text(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain;charset=UTF-8")
        self.finish(body + "\n")


class NotFound(AdminHandler):
    """Every other path (after the Host check, so that it is the same for every path)."""

    def get(self) -> None:
        self.text(404, "Not Found: the admin listener serves /healthz, /readyz, /metrics and /objects")


class Healthz(AdminHandler):
    def get(self) -> None:
        # The event loop answered: the process is alive.
        self.text(200, "ok")


class Readyz(AdminHandler):
    async def get(self) -> None:
        readiness = await self.server.readiness()
        if readiness.expected:
            # Not ready while starting or draining is the answer a load balancer's probe
            # expects during every deploy, not an error: at ERROR each probe wrote an error line.
            self.access_log_level = logging.INFO
        self.text(200 if readiness.ready else 503, readiness.text)


class Metrics(AdminHandler):
    async def get(self) -> None:
        page = await self.server.metrics_page()
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(page)


class Objects(AdminHandler):
    async def get(self) -> None:
        limit_arg = self.get_argument("limit", "1000")
        state_arg = self.get_argument("state", None)
        # ASCII digits only: str.isdigit() accepts "²", which int() refuses; and a length
        # bound before int(), which refuses over 4,300 digits.
        if not (limit_arg.isascii() and limit_arg.isdigit() and len(limit_arg) <= 6) or (
            int(limit_arg) > MAX_OBJECTS_LISTED
        ):
            self.text(400, f"limit must be a whole number from 0 to {MAX_OBJECTS_LISTED}, got {limit_arg[:20]!r}")
            return
        states = [s.value for s in ObjectState]
        if state_arg is not None and state_arg not in states:
            self.text(400, f"state must be one of {', '.join(states)}, got {state_arg[:20]!r}")
            return
        state = None if state_arg is None else ObjectState(state_arg)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(await self.server.objects_page(int(limit_arg), state), indent=1))
