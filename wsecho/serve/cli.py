"""``python -m wsecho`` and the ``wsecho`` console script: settings, logging, signals, systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from wsecho.api.app import App
from wsecho.core.errors import AppLoadError, ConfigError, StorageError
from wsecho.core.wording import counted
from wsecho.serve.appcode import load_app
from wsecho.serve.config import Settings, config_failure, parse, settings_from
from wsecho.serve.logs import LogSetup
from wsecho.serve.sdnotify import Notifier
from wsecho.serve.signals import until_stopped

log = logging.getLogger("wsecho")

if TYPE_CHECKING:
    from wsecho.serve.server import Server


class WorkerSetup(Protocol):
    """How a worker of ``--workers N`` builds its server and joins the mesh (wsecho.serve.worker)."""

    def server(self, app: App, settings: Settings, notifier: Notifier | None) -> Server: ...

    async def started(self, server: Server) -> None: ...

    async def stopped(self) -> None: ...


#: The soft open-file limit asked for when the hard limit is unlimited (macOS refuses infinity).
UNLIMITED_NOFILE_TARGET = 1 << 20


def raise_open_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; return the limit before and after.

    Every connection is a file descriptor, and the usual soft limit (1024) is far below the
    default --max-connections. Go's runtime does the same at start (since Go 1.19); the
    hard limit is what the administrator allowed (``ulimit -Hn``, ``LimitNOFILE=``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_NOFILE_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit (ulimit -n) from %d to %d: %s", soft, target, exc)
        return soft, soft
    return soft, target


async def serve(
    app: App,
    settings: Settings,
    *,
    reload: Callable[[], Settings] | None = None,
    logs: LogSetup | None = None,
    notifier: Notifier | None = None,
    worker: WorkerSetup | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain (sockets closed with 1001, storage flushed).

    A second SIGTERM/SIGINT exits at once. SIGHUP re-opens the log file and, with
    ``reload``, re-reads the settings and applies those that can change live; with
    ``--reload-code`` it then reloads the application's code (wsecho.serve.appcode).
    ``worker``: this process is one worker of ``--workers N`` (wsecho.serve.worker).
    """
    from wsecho.serve.server import Server, storage_label  # Tornado loads only when serving

    server = Server(app, settings, notifier=notifier) if worker is None else worker.server(app, settings, notifier)
    try:
        addresses = await server.start()
        if worker is not None:
            await worker.started(server)
            addresses = []  # the supervisor announces the listener
    except ConfigError as exc:
        # A certificate or key that cannot be read or does not match: bad configuration,
        # found only when the listener is set up (exit status 2, like every bad setting).
        log.error("cannot start: %s", exc)
        return 2
    except (StorageError, OSError) as exc:
        # A run-time failure (the port is taken, the data directory is locked): exit status 1.
        log.error("cannot start: %s", exc)
        return 1
    for host, port in addresses:
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "wsecho serving %s on %s://%s:%d (hibernate after %gs, max message %d bytes, data in %s, %s loop)",
            settings.app,
            "https" if server.tls is not None else "http",
            shown,
            port,
            settings.hibernate_after,
            settings.max_message_size,
            storage_label(settings),
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
    for host, port in server.admin_addresses:
        scheme = "https" if server.tls is not None and settings.admin_tls else "http"
        log.info("admin listener on %s://%s:%d (/healthz /readyz /metrics /objects)", scheme, host, port)

    def on_hup() -> None:
        if logs is not None:
            logs.reopen()
        if reload is not None:
            reread()
        if server.settings.reload_code:
            server.reloader.request("SIGHUP")

    def reread() -> None:
        assert reload is not None
        try:
            new = reload()
        except ConfigError as exc:
            log.error("SIGHUP: keeping the current settings: %s", exc)
            return
        if logs is not None:
            logs.apply(new)
        ignored = server.apply(new)
        log.info("SIGHUP: settings re-read (hibernate after %gs, log level %s)", new.hibernate_after, new.log_level)
        if ignored:
            log.warning("SIGHUP: %s changed but only take effect after a restart", ", ".join(ignored))

    first = await until_stopped(on_hup)
    log.info(
        "stopping (%s): closing %s with 1001, waiting up to %gs for the peers",
        first.name,
        counted(server.runtime.socket_count(), "WebSocket"),
        server.settings.drain_timeout,
    )
    await server.stop()
    if worker is not None:
        await worker.stopped()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["haproxy-config"]:
        from wsecho.serve.haproxy import main as haproxy_config

        try:
            return haproxy_config(given[1:])
        except ConfigError as exc:
            config_failure(str(exc))
    settings, args = parse(argv, os.environ)
    logs = LogSetup()
    try:
        logs.apply(settings)
    except OSError as exc:
        config_failure(f"--log-file {settings.log_file}: {exc.strerror}")
    try:
        app = load_app(settings.app)
    except AppLoadError as exc:
        log.debug("the application did not load", exc_info=exc.__cause__)
        config_failure(str(exc))
    before, after = raise_open_file_limit()
    if after != before:
        log.info("raised the open-file limit (ulimit -n) from %d to %d, the hard limit", before, after)
    else:
        log.info("open-file limit (ulimit -n): %d, which is also the hard limit", after)
    notifier = Notifier.from_environ(os.environ)
    try:
        loop_factory, loop_name = event_loop(settings.loop)
    except ImportError:
        config_failure("--loop uvloop: uvloop is not installed (pip install uvloop)")
    log.debug("event loop: %s", loop_name)
    if settings.workers > 1:
        from wsecho.serve.supervisor import supervise

        given = list(sys.argv[1:] if argv is None else argv)
        try:
            with asyncio.Runner() as runner:
                return runner.run(
                    supervise(
                        settings, given, notifier=notifier, logs=logs, reload=lambda: settings_from(args, os.environ)
                    )
                )
        finally:
            notifier.close()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(
                serve(app, settings, reload=lambda: settings_from(args, os.environ), logs=logs, notifier=notifier)
            )
    finally:
        notifier.close()


def event_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The loop factory for ``--loop``: uvloop when asked for, or when ``auto`` finds it."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
