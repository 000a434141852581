"""The servers under test: the Tornado baseline, ``python -m wsecho``, its wake-per-message app,
wsecho mounted in a Tornado application (scripts/bench_mounted.py), and ``python -m wsecho
--workers N`` serving the rooms applications (benchapps:rooms_app, busy_rooms_app).

Each is started on free ports, pinned to the server CPU (with ``--workers``: on every CPU),
waited for (bounded), and stopped by PID; a server that died or logged an error fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchkit.cpu import CpuMeter, SpreadCpuMeter
from benchkit.errors import BenchError
from benchkit.interrupt import check_interrupted
from benchkit.procs import HOST, PROCS, SCRIPTS, children, free_port

#: Bounds on every wait.
START_TIMEOUT = 20.0
#: Servers of scripts/bench_fanout.py, by kind.
FANOUT_BASELINES = {"fanout_tornado": "tornado", "fanout_websockets": "websockets"}
#: Kinds that serve an application of scripts/benchapps.py instead of the default one.
WSECHO_APPS = {
    "wake": "benchapps:wake_app",
    "storage": "benchapps:storage_app",
    "fanout_broadcast": "benchapps:fanout_app",
    "fanout_loop": "benchapps:fanout_loop_app",
}


@dataclasses.dataclass
class Server:
    kind: str  # "baseline", "wsecho", "wake", "storage", "mounted", "rooms", "busy_rooms", or a fan-out kind
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None
    log: Path
    #: The client's context for a server that serves wss:// (None: ws://).
    tls: ssl.SSLContext | None = None
    #: Whether it serves permessage-deflate (clients then offer it and compress).
    compression: bool = False
    #: "rooms": connection i goes to room ``i % rooms``; ``workers``: its --workers (0: not given).
    rooms: int = 0
    workers: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{HOST}:{self.port}/websocket"

    def url_of(self, index: int) -> str:
        """Where the client's connection ``index`` goes."""
        if self.rooms:
            return f"ws://{HOST}:{self.port}/room/r{index % self.rooms}"
        return self.url

    def cpu_meter(self) -> CpuMeter | SpreadCpuMeter:
        """A meter of the server's CPU from now: its one process, or the supervisor and each worker."""
        if not self.workers:
            return CpuMeter(self.pid)
        if self.workers == 1:  # --workers 1 is one process, as without the flag
            return SpreadCpuMeter({"wsecho": self.pid})
        parts = {"supervisor": self.pid} | {f"worker {pid}": pid for pid in children(self.pid)}
        return SpreadCpuMeter(parts)

    def moved_out(self) -> int:
        """How many connections its workers handed to another (admin ``/metrics``)."""
        moved = 0.0
        for line in self.admin("/metrics").splitlines():
            if line.startswith('wsecho_connections_moved_total{direction="out"'):
                moved += float(line.rsplit(None, 1)[1])
        return int(moved)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the {self.kind} server exited with {self.proc.returncode}:\n{tail(self.log)}")

    def admin(self, path: str) -> str:
        assert self.admin_port is not None
        with urllib.request.urlopen(f"http://{HOST}:{self.admin_port}{path}", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1.0)
        except (TimeoutError, OSError):
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def certificates(tmp: Path) -> tuple[list[str], ssl.SSLContext]:
    """A certificate for 127.0.0.1 from a new CA (trustme): the servers' TLS flags, the client's context."""
    import trustme  # the test extra's; only the TLS figure needs it

    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    certfile, keyfile = tmp / "bench-cert.pem", tmp / "bench-key.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return ["--certfile", str(certfile), "--keyfile", str(keyfile)], client


async def start_server(
    kind: str,
    tmp: Path,
    *,
    hibernate_after: float | None = None,
    admin: bool = False,
    tls: bool = False,
    compression: bool = False,
    flags: tuple[str, ...] = (),
    workers: int = 0,
    rooms: int = 0,
) -> Server:
    """Start a server pinned to CPU 0 and wait (bounded) until it accepts connections
    (``tls``: serving wss://; ``compression``: permessage-deflate; both the baseline and wsecho;
    ``flags``: more of wsecho's, which win over the defaults here, like ``--data-dir``).

    ``kind="rooms"`` (``"busy_rooms"``) is wsecho serving benchapps:rooms_app (busy_rooms_app)
    with ``--workers workers``, on every CPU, its client's connections spread over ``rooms``
    rooms; it is ready when ``/readyz`` says every worker is."""
    check_interrupted()
    tls_flags, client = certificates(tmp) if tls else ([], None)
    last_log = ""
    for attempt in range(3):  # a port picked here can be taken before the server binds it
        port = free_port()
        admin_port = free_port() if admin or workers else None  # --workers: /readyz says when
        log = tmp / f"{kind}-{port}.log"
        if kind == "baseline":
            argv = [sys.executable, str(SCRIPTS / "bench_baseline.py"), "--port", str(port), *tls_flags]
            if compression:
                argv.append("--compression")
        elif kind == "mounted":  # ws:// and no compression only: the mounted echo figure
            argv = [sys.executable, str(SCRIPTS / "bench_mounted.py"), "--port", str(port)]
        elif kind in FANOUT_BASELINES:
            argv = [sys.executable, str(SCRIPTS / "bench_fanout.py"), "--kind", FANOUT_BASELINES[kind]]
            argv += ["--port", str(port)]
        else:
            argv = [sys.executable, "-m", "wsecho"]
            if kind in WSECHO_APPS:
                argv.append(WSECHO_APPS[kind])
            elif kind in ("rooms", "busy_rooms"):
                argv += [f"benchapps:{kind}_app", "--workers", str(workers)]
            if kind.startswith("fanout_"):
                argv += ["--ping-interval", "0"]  # a Ping frame would be counted as a delivery
            argv += ["--port", str(port), "--data-dir", ":memory:", "--log-level", "warning"]
            argv += ["--access-log", "off", "--drain-timeout", "1", *tls_flags]
            if hibernate_after is not None:
                argv += ["--hibernate-after", str(hibernate_after)]
            if admin_port is not None:
                argv += ["--admin-port", str(admin_port)]
            if compression:
                argv += ["--compression", "on"]
            argv += flags
        proc = PROCS.start(argv, cwd=SCRIPTS, log=log, server=True, pin=not workers)
        deadline = time.monotonic() + START_TIMEOUT
        ok = await wait_listening(port, proc, deadline)
        if ok and admin_port is not None:
            ok = await wait_listening(admin_port, proc, deadline)
        if ok:
            server = Server(kind, proc, port, admin_port, log, client, compression, rooms, workers)
            if not workers or await wait_ready(server, deadline):
                return server
        PROCS.stop(proc)
        last_log = tail(log)
        if attempt < 2:
            await asyncio.sleep(0.2)
    raise BenchError(f"the {kind} server did not start:\n{last_log}")


async def wait_ready(server: Server, deadline: float) -> bool:
    """Whether the supervisor's ``/readyz`` said 200 (every worker ready) before ``deadline``."""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):  # HTTPError (503: not yet) is one
            await asyncio.to_thread(server.admin, "/readyz")
            return True
        await asyncio.sleep(0.05)
    return False


LOGGED_ERROR = re.compile(r"\bERROR\b|^Traceback", re.MULTILINE)


def stop_server(server: Server) -> None:
    """Stop the server; a server that had died, or logged an error or a traceback, fails the run."""
    alive = server.proc.poll() is None
    code = PROCS.stop(server.proc)
    if not alive:
        raise BenchError(f"the {server.kind} server had exited with {code}:\n{tail(server.log)}")
    try:
        text = server.log.read_text(errors="replace")
    except OSError:
        return
    found = LOGGED_ERROR.search(text)
    if found:
        excerpt = text[max(0, found.start() - 200) : found.start() + 1500]
        raise BenchError(f"the {server.kind} server logged an error:\n{excerpt}")
