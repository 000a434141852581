"""Settings: one table of options, read from flags, then ``WSECHO_*`` variables, then defaults.

Each option is declared once (:data:`OPTIONS`); the parser, ``--help`` and the
environment names are generated from it. A bad value raises
:class:`~wsecho.errors.ConfigError` naming the flag (and the variable, if it
came from one).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from wsecho.errors import ConfigError

DEFAULT_APP = "wsecho.examples.echo:app"
DEFAULT_DATA_DIR = "wsecho-data"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        msg = f"must be from 0 to 65535 (0 picks a free port), got {value}"
        raise ValueError(msg)
    return value


def _integer(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        msg = f"must be a whole number, got {text!r}"
        raise ValueError(msg) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"must be a number of seconds, got {text!r}"
        raise ValueError(msg) from None
    if not (value > 0 and math.isfinite(value)):
        msg = f"must be more than 0 seconds, got {text}"
        raise ValueError(msg)
    return value


def _message_size(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 2**31:
        msg = f"must be from 1 to {2**31} bytes, got {value}"
        raise ValueError(msg)
    return value


def _log_level(text: str) -> str:
    value = text.lower()
    if value not in LOG_LEVELS:
        msg = f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}"
        raise ValueError(msg)
    return value


def _data_dir(text: str) -> str:
    if not text:
        msg = "must not be empty (use :memory: for storage that does not survive a restart)"
        raise ValueError(msg)
    return text


def _host(text: str) -> str:
    if not text:
        msg = "must not be empty"
        raise ValueError(msg)
    return text


@attrs.frozen
class Option:
    flag: str
    parse: Callable[[str], Any]
    default: str
    help: str
    metavar: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "WSECHO_" + self.dest.upper()


OPTIONS = (
    Option("--host", _host, "127.0.0.1", "address to listen on", "ADDR"),
    Option("--port", _port, "8787", "port to listen on (0 picks a free one and logs it)", "PORT"),
    Option(
        "--hibernate-after",
        _positive_seconds,
        "10",
        "hibernate an object idle this long, keeping its WebSockets open",
        "SECONDS",
    ),
    Option(
        "--max-message-size",
        _message_size,
        str(1024 * 1024),
        "largest incoming WebSocket message; a larger one closes the socket with 1009",
        "BYTES",
    ),
    Option(
        "--data-dir",
        _data_dir,
        DEFAULT_DATA_DIR,
        "where objects' storage lives (SQLite); under systemd the default is $STATE_DIRECTORY; "
        ":memory: keeps it in memory only",
        "DIR",
    ),
    Option("--log-level", _log_level, "info", f"one of {', '.join(LOG_LEVELS)}", "LEVEL"),
)


@attrs.frozen
class Settings:
    app: str = DEFAULT_APP
    host: str = "127.0.0.1"
    port: int = 8787
    hibernate_after: float = 10.0
    max_message_size: int = 1024 * 1024
    data_dir: str = DEFAULT_DATA_DIR
    log_level: str = "info"

    @property
    def logging_level(self) -> int:
        return int(getattr(logging, self.log_level.upper()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsecho",
        description=(
            "Serve a wsecho application: Durable Objects-style WebSocket hibernation on Tornado. "
            "Every option can also come from the environment variable named after it "
            "(WSECHO_PORT, WSECHO_HIBERNATE_AFTER, ...); a flag wins over the variable."
        ),
    )
    parser.add_argument(
        "app",
        nargs="?",
        default=None,
        metavar="MODULE[:ATTR]",
        help=f"the application to serve, like uvicorn (MODULE alone means MODULE:app; "
        f"env WSECHO_APP; default: the built-in echo application, {DEFAULT_APP})",
    )
    for opt in OPTIONS:
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} (env {opt.env}; default {opt.default})",
        )
    return parser


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Resolve each option: flag, else ``WSECHO_*`` variable, else default."""
    values: dict[str, Any] = {"app": args.app or environ.get("WSECHO_APP") or DEFAULT_APP}
    for opt in OPTIONS:
        given = getattr(args, opt.dest)
        source = opt.flag
        if given is None and opt.env in environ:
            given, source = environ[opt.env], f"{opt.env} (for {opt.flag})"
        default = opt.default
        if opt.flag == "--data-dir" and environ.get("STATE_DIRECTORY"):
            # systemd's StateDirectory= (the first one, if it lists several)
            default = environ["STATE_DIRECTORY"].split(":")[0]
        try:
            values[opt.dest] = opt.parse(default if given is None else given)
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    return Settings(**values)


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Parse ``argv``; on a bad value print the usage and the error, and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return settings_from(args, environ)
    except ConfigError as exc:
        parser.error(str(exc))
