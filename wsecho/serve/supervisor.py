"""The supervisor of ``wsecho --workers N``: it binds the listening sockets and takes the data
directory's lock once, starts N workers that inherit both (one accept queue: a worker that
dies loses no queued connection), restarts a worker that dies (with back-off, under the same
index, so it takes its objects back), forwards SIGTERM/SIGINT/SIGHUP, serves the admin
listener for all of them, and speaks to systemd (READY once every worker is ready, STOPPING
while they drain). See docs/decisions/0005.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from wsecho.backends.base import lock_data_dir
from wsecho.backends.dsn import is_postgres_url
from wsecho.core.errors import ConfigError, StorageError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.target import AllowedHosts
from wsecho.core.wording import counted
from wsecho.serve.admin import Readiness
from wsecho.serve.config import Settings
from wsecho.serve.logs import LogSetup
from wsecho.serve.mesh import (
    ENV_CONTROL_FD,
    ENV_COUNT,
    ENV_INDEX,
    ENV_LISTEN_FDS,
    ENV_MESH_DIR,
    ENV_SUPERVISOR,
    MeshClient,
    WorkerUnavailableError,
    read_control,
)
from wsecho.serve.metrics import merge_pages
from wsecho.serve.sdnotify import Notifier
from wsecho.serve.server import STATUS_INTERVAL, backend_for, bind, start_admin, storage_label
from wsecho.serve.signals import until_stopped

log = logging.getLogger("wsecho")

#: A worker that dies is restarted after this delay, doubled for each death in a row, up to the cap.
RESTART_DELAY = 0.1
RESTART_DELAY_CAP = 10.0
#: A worker that ran this long before dying starts the back-off again from the first delay.
STABLE_AFTER = 30.0
#: How long the supervisor waits for a worker's answer to an admin question.
ADMIN_WAIT = 2.0
#: After --drain-timeout, how long the workers get to commit and exit before SIGKILL.
EXIT_GRACE = 10.0


@attrs.define
class WorkerProcess:
    """The supervisor's view of worker ``index``."""

    index: int
    process: asyncio.subprocess.Process | None = None
    control: socket.socket | None = None
    ready: bool = False
    started_at: float = 0.0
    deaths_in_a_row: int = 0
    restarts: int = 0


class Supervisor:
    """``--workers N``: the processes, their restarts, signals, systemd and the admin listener."""

    def __init__(
        self, settings: Settings, argv: Sequence[str], notifier: Notifier, logs: LogSetup | None = None
    ) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.notifier = notifier
        self.logs = logs
        self.phase = "starting"
        self.workers = [WorkerProcess(i) for i in range(settings.workers)]
        self.admin_hosts = AllowedHosts.for_listener(settings.allowed_hosts, settings.admin_host)
        self.mesh_dir = Path(tempfile.mkdtemp(prefix="wsecho-workers-"))
        self.mesh = MeshClient(self.mesh_dir, None, owner_wait=ADMIN_WAIT)
        self.listen: list[socket.socket] = []
        self.addresses: list[tuple[str, int]] = []
        self.admin_addresses: list[tuple[str, int]] = []
        self._admin: Any = None
        self._lock_fd: int | None = None
        self._all_ready = asyncio.Event()
        self._failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._watchers: set[asyncio.Task[None]] = set()

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the data directory, bind, start the workers; return when every one is ready.

        Raises StorageError / OSError (exit 1) when a worker fails before it is ready.
        """
        settings = self.settings
        await self._prepare_storage()
        if settings.admin_port is not None:
            self._admin, self.admin_addresses = start_admin(self, settings, None)
        self.listen = bind("application", settings.host, settings.port, backlog=settings.backlog)
        self.addresses = [s.getsockname()[:2] for s in self.listen]
        for worker in self.workers:
            await self._spawn(worker)
        ready: asyncio.Future[Any] = asyncio.ensure_future(self._all_ready.wait())
        failed: asyncio.Future[Any] = self._failed
        await asyncio.wait([ready, failed], return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            ready.cancel()
            raise StorageError(self._failed.result())
        self.phase = "ready"
        self.notifier.ready()

    async def _prepare_storage(self) -> None:
        """Bring the schema up to date once, before the workers open the storage. SQLite's data
        directory is locked first (held while any worker lives: they inherit the descriptor);
        a PostgreSQL database has no lock (several machines may share it)."""
        settings = self.settings
        if not is_postgres_url(settings.storage):
            if settings.data_dir == ":memory:":
                return
            self._lock_fd = lock_data_dir(Path(settings.data_dir))
            os.set_inheritable(self._lock_fd, True)
        backend = backend_for(settings.data_dir, settings.storage, lock=False)
        await backend.open()
        await backend.close()

    async def _spawn(self, worker: WorkerProcess) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in self.listen]
        passed = [*fds, theirs.fileno(), *([self._lock_fd] if self._lock_fd is not None else [])]
        env = {
            **os.environ,
            ENV_INDEX: str(worker.index),
            ENV_COUNT: str(len(self.workers)),
            ENV_LISTEN_FDS: ",".join(map(str, fds)),
            ENV_CONTROL_FD: str(theirs.fileno()),
            ENV_MESH_DIR: str(self.mesh_dir),
            ENV_SUPERVISOR: str(os.getpid()),
        }
        # The supervisor alone speaks to systemd (NotifyAccess=main).
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wsecho.serve.worker",
            *self.argv,
            pass_fds=passed,
            env=env,
            # A process group of its own: a terminal's Ctrl-C (or `timeout`) signals the
            # supervisor's group only, and the supervisor passes it on once; a second signal
            # would make a worker exit without draining.
            process_group=0,
        )
        theirs.close()
        ours.setblocking(False)
        worker.process, worker.control, worker.ready = process, ours, False
        worker.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._control_readable, worker)
        task = asyncio.ensure_future(self._watch(worker, process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _control_readable(self, worker: WorkerProcess) -> None:
        assert worker.control is not None
        data = read_control(worker.control)
        if not data:
            return
        for line in data.decode("utf-8", errors="replace").splitlines():
            if line == "READY=1" and not worker.ready:
                worker.ready = True
                log.info("worker %d ready", worker.index)
                if all(w.ready for w in self.workers):
                    self._all_ready.set()

    async def _watch(self, worker: WorkerProcess, process: asyncio.subprocess.Process) -> None:
        status = await process.wait()
        if worker.control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(worker.control.fileno())
            worker.control.close()
            worker.control = None
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        if self.phase in ("draining", "stopped"):
            log.info("worker %d (pid %d) %s", worker.index, process.pid, how)
            return
        if self.phase == "starting" and not worker.ready:
            # A worker that cannot start (its storage, its import) will not start on a retry either.
            if not self._failed.done():
                self._failed.set_result(f"worker {worker.index} (pid {process.pid}) {how} before it was ready")
            return
        worker.ready = False
        ran = time.monotonic() - worker.started_at
        worker.deaths_in_a_row = 1 if ran >= STABLE_AFTER else worker.deaths_in_a_row + 1
        delay = min(RESTART_DELAY * 2 ** (worker.deaths_in_a_row - 1), RESTART_DELAY_CAP)
        log.error(
            "worker %d (pid %d) %s after %.1fs; its objects wait until it is restarted in %gs",
            worker.index,
            process.pid,
            how,
            ran,
            delay,
        )
        await asyncio.sleep(delay)
        if self.phase == "ready":
            worker.restarts += 1
            await self._spawn(worker)

    # -- run and stop ------------------------------------------------------------------------

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def stop(self) -> int:
        """SIGTERM every worker (each closes its sockets with 1001 and commits); wait, bounded."""
        self.phase = "draining"
        self.notifier.stopping()
        self.signal_workers(signal.SIGTERM)
        deadline = self.settings.drain_timeout + EXIT_GRACE
        processes = [w.process for w in self.workers if w.process is not None]
        try:
            async with asyncio.timeout(deadline):
                statuses = [await p.wait() for p in processes]
        except TimeoutError:
            log.error("workers still running %gs after SIGTERM: killing them", deadline)
            self.signal_workers(signal.SIGKILL)
            statuses = [await p.wait() for p in processes]
        for task in list(self._watchers):
            task.cancel()
        self.close()
        failed = [s for s in statuses if s != 0]
        return 1 if failed else 0

    def close(self) -> None:
        self.phase = "stopped"
        self.mesh.close()
        if self._admin is not None:
            self._admin.stop()
        for sock in self.listen:
            sock.close()
        for worker in self.workers:
            if worker.control is not None:
                worker.control.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        shutil.rmtree(self.mesh_dir, ignore_errors=True)

    async def report_status(self) -> None:
        """systemd's STATUS= line: every worker's sockets and objects, summed."""
        sockets = active = hibernating = 0
        for worker in self.workers:
            with contextlib.suppress(Exception):
                s, a, h = await self.mesh.call(worker.index, "status", None, wait=ADMIN_WAIT)
                sockets, active, hibernating = sockets + s, active + a, hibernating + h
        ready = sum(1 for w in self.workers if w.ready)
        self.notifier.status(
            f"{self.phase}: {counted(ready, 'worker')} of {len(self.workers)} ready; "
            f"{counted(sockets, 'WebSocket')}; objects: {active} active, {hibernating} hibernating"
        )

    # -- the admin endpoints (AdminSource) ----------------------------------------------------

    async def _ask(self, op: str, payload: Any) -> dict[int, Any]:
        """Ask every worker; a worker that is down or does not answer in time is left out."""

        async def one(index: int) -> Any:
            return await asyncio.wait_for(self.mesh.call(index, op, payload, wait=ADMIN_WAIT), ADMIN_WAIT)

        answers = await asyncio.gather(*(one(w.index) for w in self.workers), return_exceptions=True)
        return {i: a for i, a in enumerate(answers) if not isinstance(a, BaseException)}

    async def readiness(self) -> Readiness:
        if self.phase != "ready":
            return Readiness(False, self.phase, expected=True)
        answers = await self._ask("readiness", None)
        details = []
        for worker in self.workers:
            answer = answers.get(worker.index)
            if answer is None or not worker.ready:
                return Readiness(False, f"worker {worker.index} is not running (being restarted)", expected=True)
            ready, text, expected = answer
            if not ready:
                return Readiness(False, f"worker {worker.index}: {text}", expected=expected)
            if text != "ready":  # ready, with a detail (a failed code reload)
                details.append(f"worker {worker.index}: {text}")
        return Readiness(True, "; ".join(["ready", *details]))

    async def metrics_page(self) -> bytes:
        pages = await self._ask("metrics", None)
        lines = [
            "# HELP wsecho_workers worker processes (--workers), by state",
            "# TYPE wsecho_workers gauge",
        ]
        ready = sum(1 for w in self.workers if w.ready)
        lines.append(f'wsecho_workers{{state="ready"}} {ready}')
        lines.append(f'wsecho_workers{{state="not_ready"}} {len(self.workers) - ready}')
        lines.append("# HELP wsecho_worker_restarts_total workers restarted after they died")
        lines.append("# TYPE wsecho_worker_restarts_total counter")
        lines.append(f"wsecho_worker_restarts_total {sum(w.restarts for w in self.workers)}")
        return merge_pages(pages, ("\n".join(lines) + "\n").encode("utf-8"))

    async def objects_page(self, limit: int, state: ObjectState | None) -> dict[str, Any]:
        answers = await self._ask("objects", (limit, None if state is None else state.value))
        listed: list[dict[str, Any]] = []
        count = 0
        for index, answer in sorted(answers.items()):
            count += answer["count"]
            for obj in answer["objects"]:
                listed.append({**obj, "worker": index})
        listed = listed[:limit]
        missing = [w.index for w in self.workers if w.index not in answers]
        return {"count": count, "shown": len(listed), "objects": listed, "workers_not_answering": missing}


async def supervise(
    settings: Settings,
    argv: Sequence[str],
    *,
    notifier: Notifier,
    logs: LogSetup | None = None,
    reload: Callable[[], Settings] | None = None,
) -> int:
    """Run ``--workers N`` until SIGTERM/SIGINT; return the exit status."""
    supervisor = Supervisor(settings, argv, notifier, logs)
    try:
        await supervisor.start()
    except (StorageError, OSError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        supervisor.signal_workers(signal.SIGTERM)
        for worker in supervisor.workers:
            if worker.process is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.process.wait(), EXIT_GRACE)
        supervisor.close()
        return 1
    for host, port in supervisor.addresses:
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "wsecho serving %s on http://%s:%d with %s (hibernate after %gs, data in %s)",
            settings.app,
            shown,
            port,
            counted(settings.workers, "worker"),
            settings.hibernate_after,
            storage_label(settings),
        )
    for host, port in supervisor.admin_addresses:
        log.info("admin listener on http://%s:%d (/healthz /readyz /metrics /objects)", host, port)

    def on_hup() -> None:
        if logs is not None:
            logs.reopen()
            if reload is not None:
                with contextlib.suppress(ConfigError):
                    logs.apply(reload())
        supervisor.signal_workers(signal.SIGHUP)
        log.info("SIGHUP: passed to every worker")

    status_task = asyncio.ensure_future(_status_loop(supervisor))
    first = await until_stopped(
        on_hup,
        at_once="killing the workers and exiting at once",
        before_exit=lambda: supervisor.signal_workers(signal.SIGKILL),
    )
    status_task.cancel()
    log.info(
        "stopping (%s): each of %s closes its WebSockets with 1001 and commits",
        first.name,
        counted(len(supervisor.workers), "worker"),
    )
    code = await supervisor.stop()
    log.info("stopped")
    return code


async def _status_loop(supervisor: Supervisor) -> None:
    while True:
        with contextlib.suppress(WorkerUnavailableError, OSError):
            await supervisor.report_status()
        await asyncio.sleep(STATUS_INTERVAL)
