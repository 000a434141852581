"""One worker of ``wsecho --workers N``: ``python -m wsecho.serve.worker ARGS`` (started by the
supervisor, never by hand).

It parses the same arguments and environment as the supervisor, serves the listening
sockets it inherited, owns the objects of its slots (wsecho.core.placement), and joins the
mesh (wsecho.serve.mesh): it answers the other workers' calls and adopts the connections
they hand over. It tells the supervisor that it is ready on its control socket, and stops
(draining like a single process) on SIGTERM or when the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from wsecho.core.errors import AppLoadError
from wsecho.core.lifecycle import ObjectState
from wsecho.core.placement import Placement
from wsecho.serve.appcode import load_app
from wsecho.serve.cli import event_loop, serve
from wsecho.serve.config import Settings, config_failure, parse, settings_from
from wsecho.serve.logs import LogSetup
from wsecho.serve.mesh import (
    ENV_CONTROL_FD,
    ENV_COUNT,
    ENV_INDEX,
    ENV_LISTEN_FDS,
    ENV_MESH_DIR,
    ENV_SUPERVISOR,
    WORKER_ENV,
    MeshClient,
    MeshServer,
    object_handlers,
    read_control,
)
from wsecho.serve.sdnotify import Notifier

if TYPE_CHECKING:
    from wsecho.api.app import App
    from wsecho.serve.server import Server

#: prctl(2): deliver this signal when the parent dies.
PR_SET_PDEATHSIG = 1


class ControlNotifier(Notifier):
    """Tells the supervisor (not systemd) over the control socket: ``ready``, ``stopping``."""

    def __init__(self, control: socket.socket) -> None:
        super().__init__(None)
        self._control = control

    def send(self, *assignments: str) -> bool:
        super().send(*assignments)  # the checks
        line = "\n".join(assignments) + "\n"
        try:
            self._control.sendall(line.encode("utf-8"))
        except OSError:
            return False
        return True


@attrs.define
class Worker:
    """A worker's setup for :func:`wsecho.serve.cli.serve`."""

    placement: Placement
    mesh_dir: Path
    sockets: list[socket.socket]
    control: socket.socket
    mesh: MeshClient = attrs.field(init=False)
    mesh_server: MeshServer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.mesh = MeshClient(self.mesh_dir, self.placement.index)
        self.mesh_server = MeshServer(self.mesh_dir, self.placement.index)

    def server(self, app: App, settings: Settings, notifier: Notifier | None) -> Server:
        from wsecho.serve.server import Server

        return Server(
            app,
            settings,
            notifier=ControlNotifier(self.control),
            placement=self.placement,
            mesh=self.mesh,
            sockets=self.sockets,
        )

    async def started(self, server: Server) -> None:
        await self.mesh_server.start(handlers(server), server.adopt)
        # The supervisor going away (its end of the control socket closes) stops this worker too.
        asyncio.get_running_loop().add_reader(self.control.fileno(), self._control_readable)

    def _control_readable(self) -> None:
        if read_control(self.control) == b"":
            os.kill(os.getpid(), signal.SIGTERM)

    async def stopped(self) -> None:
        await self.mesh_server.close()
        self.mesh.close()


def handlers(server: Server) -> dict[str, Any]:
    """What this worker answers on the mesh."""
    runtime = server.runtime

    async def metrics(_: Any) -> bytes:
        return await server.metrics_page()

    async def objects(payload: Any) -> dict[str, Any]:
        limit, state = payload
        return await server.objects_page(limit, None if state is None else ObjectState(state))

    async def readiness(_: Any) -> tuple[bool, str, bool]:
        r = await server.readiness()
        return r.ready, r.text, r.expected

    async def status(_: Any) -> tuple[int, int, int]:
        states = [h.lifecycle.state for h in runtime.hosts()]
        active = sum(1 for s in states if s is ObjectState.ACTIVE)
        return runtime.socket_count(), active, len(states) - active

    return {
        **object_handlers(runtime),
        "peer": server.answer_peer,
        "metrics": metrics,
        "objects": objects,
        "readiness": readiness,
        "status": status,
    }


def die_with_supervisor(supervisor: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux), and exit now if it already has."""
    name = ctypes.util.find_library("c")
    if name is not None:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:
        sys.exit(1)


def from_environ(environ: Mapping[str, str]) -> Worker:
    index, count = int(environ[ENV_INDEX]), int(environ[ENV_COUNT])
    sockets = [socket.socket(fileno=int(fd)) for fd in environ[ENV_LISTEN_FDS].split(",")]
    control = socket.socket(fileno=int(environ[ENV_CONTROL_FD]))
    control.setblocking(False)
    return Worker(Placement(index, count), Path(environ[ENV_MESH_DIR]), sockets, control)


def main(argv: Sequence[str] | None = None) -> int:
    if ENV_INDEX not in os.environ:
        sys.stderr.write("wsecho.serve.worker is started by `wsecho --workers N`, not by hand\n")
        return 2
    die_with_supervisor(int(os.environ[ENV_SUPERVISOR]))
    worker = from_environ(os.environ)
    for name in WORKER_ENV:
        os.environ.pop(name, None)
    settings, args = parse(argv, os.environ)
    settings = attrs.evolve(settings, admin_port=None)  # the supervisor serves the admin listener
    logs = LogSetup(worker=worker.placement.index)
    logs.apply(settings)
    try:
        app = load_app(settings.app)
    except AppLoadError as exc:
        config_failure(str(exc))
    loop_factory, _ = event_loop(settings.loop)

    def reload() -> Settings:
        return attrs.evolve(settings_from(args, os.environ), admin_port=None)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(app, settings, reload=reload, logs=logs, worker=worker))


if __name__ == "__main__":
    sys.exit(main())
