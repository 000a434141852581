"""The servers under test: the Tornado baseline, ``python -m wsecho``, its wake-per-message app,
and wsecho mounted in a Tornado application (scripts/bench_mounted.py).

Each is started on free ports, pinned to the server CPU, waited for (bounded), and stopped by
PID; a server that died or logged an error fails the run.
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

from benchkit.errors import BenchError
from benchkit.interrupt import check_interrupted
from benchkit.procs import HOST, PROCS, SCRIPTS, free_port

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
    kind: str  # "baseline", "wsecho", "wake", "storage", "mounted", or one of the fan-out kinds
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None
    log: Path
    #: The client's context for a server that serves wss:// (None: ws://).
    tls: ssl.SSLContext | None = None
    #: Whether it serves permessage-deflate (clients then offer it and compress).
    compression: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{HOST}:{self.port}/websocket"

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
) -> Server:
    """Start a server pinned to CPU 0 and wait (bounded) until it accepts connections
    (``tls``: serving wss://; ``compression``: permessage-deflate; both the baseline and wsecho;
    ``flags``: more of wsecho's, which win over the defaults here, like ``--data-dir``)."""
    check_interrupted()
    tls_flags, client = certificates(tmp) if tls else ([], None)
    last_log = ""
    for attempt in range(3):  # a port picked here can be taken before the server binds it
        port = free_port()
        admin_port = free_port() if admin else None
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
        proc = PROCS.start(argv, cwd=SCRIPTS, log=log, server=True)
        deadline = time.monotonic() + START_TIMEOUT
        ok = await wait_listening(port, proc, deadline)
        if ok and admin_port is not None:
            ok = await wait_listening(admin_port, proc, deadline)
        if ok:
            return Server(kind, proc, port, admin_port, log, client, compression)
        PROCS.stop(proc)
        last_log = tail(log)
        if attempt < 2:
            await asyncio.sleep(0.2)
    raise BenchError(f"the {kind} server did not start:\n{last_log}")


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
