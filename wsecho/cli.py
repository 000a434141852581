"""``python -m wsecho`` and the ``wsecho`` console script."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from wsecho.app import App
from wsecho.config import Settings, build_parser, parse
from wsecho.errors import AppLoadError, StorageError

log = logging.getLogger("wsecho")


def load_app(spec: str) -> App:
    """Import ``module:attr`` (``module`` alone means ``module:app``), like uvicorn."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        msg = f"cannot load {spec!r}: expected MODULE or MODULE:ATTR"
        raise AppLoadError(msg)
    # Like uvicorn: modules in the working directory are importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot load {spec!r}: {exc}"
        raise AppLoadError(msg) from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        msg = f"cannot load {spec!r}: {module_name}.{attr} must be a wsecho.App, found {found}"
        raise AppLoadError(msg)
    return app


async def serve(app: App, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then close every WebSocket with 1001 and return."""
    from wsecho.server import Server  # Tornado loads only when serving

    server = Server(app, settings)
    try:
        addresses = await server.start()
    except (StorageError, OSError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from exc
    for host, port in addresses:
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "wsecho serving %s on http://%s:%d (hibernate after %gs, max message %d bytes, data in %s)",
            settings.app,
            shown,
            port,
            settings.hibernate_after,
            settings.max_message_size,
            settings.data_dir,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: closing %d WebSockets with 1001", server.runtime.socket_count())
    await server.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse(argv, os.environ)
    logging.basicConfig(
        level=settings.logging_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = load_app(settings.app)
    except AppLoadError as exc:
        build_parser().error(str(exc))
    asyncio.run(serve(app, settings))
    return 0
