"""Logging set-up: human-readable text or one JSON object a line, to stderr or a re-openable file."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from wsecho.serve.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the traceback if any
    (and, in a worker of ``--workers N``, the worker's index)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            data["worker"] = self.worker
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class LogSetup:
    """Owns the root handler so that SIGHUP can re-open the log file and apply new settings."""

    def __init__(self, worker: int | None = None) -> None:
        """``worker``: this process is that worker of ``--workers N`` (its lines say so)."""
        self.worker = worker
        self._handler: logging.Handler | None = None
        self._settings: Settings | None = None

    def apply(self, settings: Settings) -> None:
        root = logging.getLogger()
        if self._handler is not None:
            root.removeHandler(self._handler)
            self._handler.close()
        handler: logging.Handler
        if settings.log_file:
            handler = logging.FileHandler(settings.log_file, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        text = TEXT_FORMAT if self.worker is None else TEXT_FORMAT.replace("%(name)s", f"worker {self.worker} %(name)s")
        handler.setFormatter(JsonFormatter(self.worker) if settings.log_format == "json" else logging.Formatter(text))
        root.addHandler(handler)
        root.setLevel(settings.logging_level)
        # Tornado's one line per HTTP request; off with --access-log off.
        logging.getLogger("tornado.access").disabled = not settings.access_log
        self._handler = handler
        self._settings = settings

    def reopen(self) -> None:
        """Close and open the log file again (after logrotate moved it)."""
        if self._settings is not None:
            self.apply(self._settings)
