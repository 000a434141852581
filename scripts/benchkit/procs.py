"""The processes the benchmark starts: where they run (CPU pinning, file limit), stopping them by PID.

Also what the benchmark reads about a process from ``/proc`` (its RSS) and the free ports it
gives the servers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
from pathlib import Path

from benchkit.errors import BenchError

#: scripts/, where the baseline server and benchapps live (this file is scripts/benchkit/procs.py).
SCRIPTS = Path(__file__).resolve().parent.parent

ROOT = SCRIPTS.parent

HOST = "127.0.0.1"

SERVER_CPU = 0

CLIENT_CPU = 1

STOP_TIMEOUT = 8.0


def pinning_possible() -> bool:
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False
    return {SERVER_CPU, CLIENT_CPU} <= cpus


PIN = pinning_possible()


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _server_preexec() -> None:
    # Runs in the child between fork and exec: both settings survive the exec.
    raise_nofile_limit()
    if PIN:
        os.sched_setaffinity(0, {SERVER_CPU})


class Processes:
    """Every process this benchmark started, stopped by PID: SIGTERM, then SIGKILL after a bound."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, cwd: Path, log: Path, server: bool) -> subprocess.Popen[bytes]:
        # Settings come from the command line only (WSECHO_* variables of the caller would change
        # them), except that the connection limit is lifted for the 19,000-socket memory test (a
        # variable, not a flag, so that a wsecho without that setting still starts).
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSECHO_")}
        env["WSECHO_MAX_CONNECTIONS"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_server_preexec if server else None,  # no threads here
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children ourselves
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        if proc in self.running:
            self.running.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc, timeout=3.0)


PROCS = Processes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for PID {pid}")
