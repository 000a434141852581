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
from collections.abc import Iterator
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


def usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


#: The CPUs this process may run on, read when the module is imported (before the benchmark
#: pins itself to the client's CPU): where an unpinned server (``--workers``) and client run.
ALL_CPUS = usable_cpus()


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """This process (the load client) on every CPU for the block, then back on the client's CPU."""
    if not PIN:
        yield
        return
    os.sched_setaffinity(0, ALL_CPUS)
    try:
        yield
    finally:
        os.sched_setaffinity(0, {CLIENT_CPU})


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


def _unpinned_server_preexec() -> None:
    # A server of several processes (--workers): every CPU, whatever this process is pinned to.
    raise_nofile_limit()
    if PIN:
        os.sched_setaffinity(0, ALL_CPUS)


class Processes:
    """Every process this benchmark started, stopped by PID: SIGTERM, then SIGKILL after a bound."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], *, cwd: Path, log: Path, server: bool, pin: bool = True
    ) -> subprocess.Popen[bytes]:
        """``server``: with a higher file limit, pinned to the server's CPU (``pin``) or on every CPU."""
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
                preexec_fn=(_server_preexec if pin else _unpinned_server_preexec) if server else None,  # no threads
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


def children(pid: int) -> list[int]:
    """The PIDs of the live children of ``pid`` (from /proc), lowest first."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)
