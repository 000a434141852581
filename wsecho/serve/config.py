"""Settings: one table of options, read from flags, ``WSECHO_*`` variables, a TOML file, defaults.

Each option is declared once (:data:`OPTIONS`); the parser, ``--help``, the
environment names and the config-file keys are generated from it. Precedence:
a flag wins over its variable, which wins over the file, which wins over the
default. A bad value or an unknown file key raises
:class:`~wsecho.core.errors.ConfigError` naming where it came from.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import math
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NoReturn

import attrs

from wsecho.backends.dsn import is_postgres_url, redact
from wsecho.core.errors import ConfigError
from wsecho.core.fanout import MIN_QUEUE_BYTES
from wsecho.core.forwarded import TrustedProxies
from wsecho.core.limits import Limits
from wsecho.core.memory import Mark
from wsecho.core.target import normalize_host

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


def _seconds(text: str, *, zero_allowed: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"must be a number of seconds, got {text!r}"
        raise ValueError(msg) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
        bound = "0 seconds or more" if zero_allowed else "more than 0 seconds"
        msg = f"must be {bound}, got {text}"
        raise ValueError(msg)
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, zero_allowed=False)


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


def _storage(text: str) -> str:
    if text == "sqlite":
        return text
    if not is_postgres_url(text):
        shown = redact(text) if "://" in text else text
        msg = f"must be sqlite or a postgresql:// (or postgres://) URL, got {shown!r}"
        raise ValueError(msg)
    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        msg = "a PostgreSQL URL needs psycopg and psycopg-pool: pip install 'wsecho[postgres]'"
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
    #: The :class:`~wsecho.core.limits.Limits` field this option sets (SPEC §4), if any.
    limit: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "WSECHO_" + self.dest.upper()


def _admin_port(text: str) -> int | None:
    if text.lower() in ("off", ""):
        return None
    return _port(text)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.lower()
        if value not in allowed:
            msg = f"must be one of {', '.join(allowed)}, got {text!r}"
            raise ValueError(msg)
        return value

    return parse


def _switch(text: str) -> bool:
    value = text.lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    msg = f"must be on or off, got {text!r}"
    raise ValueError(msg)


def _non_negative_seconds(text: str) -> float:
    return _seconds(text, zero_allowed=True)


#: The schemes a member's peer address may carry (docs/decisions/0013); none means plain HTTP.
PEER_SCHEMES = ("http://", "https://")


def split_peer_address(address: str) -> tuple[bool, str, int]:
    """``[https://|http://]HOST:PORT`` (a member's advertised address) as (whether TLS, host
    without IPv6 brackets, port); a bare ``HOST:PORT`` is plain HTTP, as members of the
    releases before 0013 advertise it. ValueError when it is none of these."""
    scheme = next((s for s in PEER_SCHEMES if address.startswith(s)), "")
    host, _, port = address.removeprefix(scheme).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"must be HOST:PORT, http://HOST:PORT or https://HOST:PORT, got {address!r}"
        raise ValueError(msg)
    return scheme == "https://", host.strip("[]"), int(port)


def _cluster_address(text: str) -> str:
    if not text:
        return text
    try:
        _, host, _ = split_peer_address(text)
    except ValueError:
        host = ""
    if not host or host in WILDCARD_HOSTS or f"[{host}]" in WILDCARD_HOSTS:
        msg = (
            "must be HOST:PORT that the other members can reach (not a wildcard address), or "
            f"https://HOST:PORT, got {text!r}"
        )
        raise ValueError(msg)
    return text


def _any_text(text: str) -> str:
    return text


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            msg = f"must be {minimum} or more, got {value}"
            raise ValueError(msg)
        return value

    return parse


_count = _at_least(0)
_backlog = _at_least(1)


_BINARY_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def _bytes(text: str) -> int:
    """Bytes: a whole number of at least 1, optionally with KiB, MiB, GiB or TiB."""
    value = text.strip().lower()
    unit = 1
    for suffix, size in _BINARY_UNITS.items():
        if value.endswith(suffix):
            value, unit = value[: -len(suffix)].strip(), size
            break
    if not value.isascii() or not value.isdigit() or int(value) == 0:
        msg = f"must be a number of bytes of 1 or more (like 2048 or 64MiB), got {text!r}"
        raise ValueError(msg)
    return int(value) * unit


def _quota(text: str) -> int | None:
    """Bytes (see :func:`_bytes`), or 0 / off for no quota."""
    if text.strip().lower() in ("off", "0"):
        return None
    try:
        return _bytes(text)
    except ValueError:
        msg = f"must be a number of bytes (like 1048576 or 64MiB), or off, got {text!r}"
        raise ValueError(msg) from None


def _bytes_text(value: int | None) -> str:
    """How a size reads in ``--help`` and the README: 128MiB rather than 134217728."""
    if value is None:
        return "off"
    for suffix, size in reversed(_BINARY_UNITS.items()):
        if size >= 1024**2 and value % size == 0:
            return f"{value // size}{suffix[0].upper()}iB"
    return str(value)


def _limit(
    flag: str, field: str, parse: Callable[[str], Any], meaning: str, metavar: str, show: Callable[[Any], str] = str
) -> Option:
    """An option for the :class:`Limits` field ``field``, whose default (Cloudflare's) it keeps."""
    default = attrs.fields_dict(Limits)[field].default
    return Option(flag, parse, show(default), meaning, metavar, limit=field)


def _fanout_queue(text: str) -> int:
    """Bytes (see :func:`_bytes`), at least the send queue's high-water mark."""
    value = _bytes(text)
    if value >= MIN_QUEUE_BYTES:
        return value
    msg = f"must be at least {MIN_QUEUE_BYTES} bytes (64KiB, the send queue's high-water mark), got {value}"
    raise ValueError(msg)


def memory_mark(text: str) -> Mark | None:
    """A percentage (of the cgroup's memory.max, else of the machine's memory), bytes, or off."""
    value = text.strip().lower()
    if value in ("off", "0", "0%"):
        return None
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:
            msg = f"must be a percentage from 0 to 100 (like 80%), a number of bytes (like 6GiB), or off, got {text!r}"
            raise ValueError(msg)
        return Mark(percent, percent=True)
    try:
        return Mark(_bytes(text))
    except ValueError:
        msg = f"must be a percentage (like 80%), a number of bytes (like 6GiB), or off, got {text!r}"
        raise ValueError(msg) from None


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/").lower() for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            msg = f"each origin must look like https://example.com (or be *), got {origin!r}"
            raise ValueError(msg)
    return origins


def _allowed_hosts(text: str) -> tuple[str, ...]:
    """``auto`` (empty: each listener decides from its address) or the normalized entries."""
    if text.strip().lower() in ("auto", ""):
        return ()
    return tuple(normalize_host(h) for h in text.split(",") if h.strip())


def _route_key(text: str) -> str:
    if text:
        kind, _, arg = text.partition(":")
        ok = (kind == "path" and arg.isdigit() and 1 <= int(arg) <= 32) or (kind in ("query", "header") and arg)
        if not ok:
            msg = f"must be path:N (1 to 32), query:NAME or header:NAME, got {text!r}"
            raise ValueError(msg)
    return text


#: The most worker processes --workers starts.
MAX_WORKERS = 256


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a cgroup cpuset or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return min(usable_cpus(), MAX_WORKERS)
    count = _integer(text)
    if not 1 <= count <= MAX_WORKERS:
        msg = f"must be auto or a whole number from 1 to {MAX_WORKERS}, got {text!r}"
        raise ValueError(msg)
    return count


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
    Option(
        "--storage",
        _storage,
        "sqlite",
        "where objects' storage lives: sqlite (in --data-dir) or a PostgreSQL URL, "
        "postgresql://USER@HOST:PORT/DATABASE (put the password in ~/.pgpass or PGPASSFILE, not here)",
        "sqlite|URL",
    ),
    Option(
        "--max-connections",
        _count,
        "10000",
        "most WebSocket connections at once; an upgrade beyond it gets 503 (0: no limit)",
        "N",
    ),
    Option(
        "--max-http-connections",
        _count,
        "1000",
        "most plain HTTP connections at once (keep-alive ones too, not yet upgraded); a request "
        "on a connection beyond it gets 503 and the connection is closed (0: no limit)",
        "N",
    ),
    Option(
        "--max-body-memory",
        _count,
        str(64 * 1024 * 1024),
        "most bytes of request bodies held in memory at once, over all connections; a request "
        "whose body does not fit gets 503 (0: no limit)",
        "BYTES",
    ),
    Option(
        "--backlog",
        _backlog,
        "2048",
        "length of the listen queue (the kernel caps it at net.core.somaxconn)",
        "N",
    ),
    Option(
        "--allowed-origins",
        _origins,
        "",
        "Origin values allowed to open WebSockets, comma-separated, or * for any; requests "
        "without Origin and same-origin requests are always allowed",
        "ORIGINS",
    ),
    Option(
        "--allowed-hosts",
        _allowed_hosts,
        "auto",
        "Host names both listeners answer to, comma-separated (.example.com: the domain and its "
        "subdomains; *: any); others get 421 (DNS rebinding). localhost, 127.0.0.1, [::1] and the "
        "listener's own address always pass; auto: only those on a loopback address, any host otherwise",
        "HOSTS",
    ),
    Option(
        "--forwarded-allow-ips",
        TrustedProxies.parse,
        "",
        "addresses and CIDR networks of the reverse proxies to trust, comma-separated, or * for any "
        "peer; from them the client's address comes from X-Forwarded-For (into CF-Connecting-IP and "
        "the access log) and the URL's scheme from X-Forwarded-Proto; from any other peer those "
        "headers are ignored",
        "IPS",
    ),
    Option(
        "--handshake-timeout",
        _positive_seconds,
        "5",
        "a client must send its request headers within this time (slowloris), also the keep-alive idle limit",
        "SECONDS",
    ),
    Option(
        "--ping-interval",
        _non_negative_seconds,
        "30",
        "ping each WebSocket peer this often, to find dead connections (0: never)",
        "SECONDS",
    ),
    Option(
        "--ping-timeout",
        _positive_seconds,
        "20",
        "a peer that does not answer a ping with its payload within this time, or whose send queue "
        "does not drain for this long, is cut (its close code is 1006)",
        "SECONDS",
    ),
    Option(
        "--max-outgoing-total",
        _count,
        str(256 * 1024 * 1024),
        "bytes queued for all slow WebSocket peers together; past it the peers with the most queued "
        "are cut with 1008 (0: no limit; each peer's own limit is 16 MiB)",
        "BYTES",
    ),
    Option(
        "--compression",
        _switch,
        "off",
        "permessage-deflate (RFC 7692) for WebSockets whose client offers it: on or off "
        "(an application's 101 may decide per socket with Sec-WebSocket-Extensions)",
        "on|off",
    ),
    Option(
        "--admin-host",
        _host,
        "127.0.0.1",
        "address of the admin listener (/healthz, /readyz, /metrics, /objects)",
        "ADDR",
    ),
    Option("--admin-port", _admin_port, "off", "port of the admin listener, or off", "PORT"),
    Option(
        "--certfile",
        _any_text,
        "",
        "serve https:// and wss:// with this PEM certificate chain (with --keyfile; SIGHUP re-reads both)",
        "PATH",
    ),
    Option("--keyfile", _any_text, "", "the PEM private key of --certfile", "PATH"),
    Option(
        "--admin-tls",
        _switch,
        "off",
        "serve the admin listener over TLS too, with --certfile and --keyfile: on or off",
        "on|off",
    ),
    Option(
        "--drain-timeout",
        _non_negative_seconds,
        "5",
        "on SIGTERM, how long to wait for peers to answer the 1001 Close before cutting them",
        "SECONDS",
    ),
    Option(
        "--reload-code",
        _switch,
        "off",
        "on SIGHUP, also reload the application's code in place: its objects hibernate, its "
        "modules are imported again, WebSockets stay open; on or off",
        "on|off",
    ),
    Option(
        "--reload",
        _switch,
        "off",
        "for development: reload the application's code the same way whenever one of its files changes; on or off",
        "on|off",
    ),
    _limit(
        "--max-object-storage",
        "object_storage_bytes",
        _quota,
        "bytes one object may store (keys plus encoded values); put() beyond it raises "
        "QuotaExceededError (off: no quota)",
        "BYTES",
        show=_bytes_text,
    ),
    _limit(
        "--max-storage",
        "storage_bytes",
        _quota,
        "bytes all objects together may store; put() beyond it raises QuotaExceededError (off: no quota)",
        "BYTES",
        show=_bytes_text,
    ),
    _limit(
        "--max-sockets-per-object",
        "sockets_per_object",
        _at_least(1),
        "hibernatable WebSockets one object may hold; accept_web_socket() beyond it raises InvalidStateError",
        "N",
    ),
    _limit(
        "--max-tags-per-socket",
        "tags_per_socket",
        _at_least(1),
        "distinct tags accept_web_socket() takes for one socket; more raise InvalidArgumentError",
        "N",
    ),
    _limit(
        "--max-tag-bytes",
        "tag_bytes",
        _bytes,
        "UTF-8 length of each tag; a longer one makes accept_web_socket() raise InvalidArgumentError",
        "BYTES",
    ),
    _limit(
        "--max-attachment-bytes",
        "attachment_bytes",
        _bytes,
        "encoded size of a socket's attachment; serialize_attachment() beyond it raises "
        "InvalidArgumentError and keeps the previous one",
        "BYTES",
    ),
    _limit(
        "--max-auto-response-bytes",
        "auto_response_bytes",
        _bytes,
        "UTF-8 length of the auto-response request and of its response; "
        "set_web_socket_auto_response() beyond it raises InvalidArgumentError",
        "BYTES",
    ),
    _limit(
        "--max-auto-responses",
        "auto_responses",
        _at_least(1),
        "request/response pairs one object may set with set_web_socket_auto_responses(); "
        "more raise InvalidArgumentError",
        "N",
    ),
    _limit(
        "--max-event-timeout",
        "event_timeout_ms",
        _at_least(1),
        "largest set_hibernatable_web_socket_event_timeout() an object may set, in milliseconds "
        "(the API's unit); a larger one raises InvalidArgumentError",
        "MS",
    ),
    _limit(
        "--max-fanout-queue",
        "fanout_queue_bytes",
        _fanout_queue,
        "bytes queued for one WebSocket past which ctx.broadcast() drops the message for it or closes "
        "it with 1008 (its class's fanout_overflow), unless the class sets fanout_queue_bytes; "
        f"at least {MIN_QUEUE_BYTES // 1024}KiB",
        "BYTES",
        show=_bytes_text,
    ),
    _limit(
        "--max-outbound-per-object",
        "outbound_per_object",
        _at_least(1),
        "outbound WebSockets one object may hold (ctx.connect_web_socket); beyond it the call raises InvalidStateError",
        "N",
    ),
    _limit(
        "--max-outbound",
        "outbound_sockets",
        _at_least(1),
        "outbound WebSockets this process may hold, all objects together (each worker of --workers "
        "has its own); beyond it ctx.connect_web_socket raises InvalidStateError",
        "N",
    ),
    Option(
        "--outbound-connect-timeout",
        _positive_seconds,
        "10",
        "seconds ctx.connect_web_socket may take to connect, do TLS and get the upstream's 101; "
        "then it raises OutboundConnectError",
        "SECONDS",
    ),
    Option(
        "--outbound-ca-file",
        _any_text,
        "",
        "PEM file of the CAs that wss:// upstreams of ctx.connect_web_socket must be signed by (empty: the system's)",
        "PATH",
    ),
    Option(
        "--max-active-objects",
        _count,
        "0",
        "objects kept in memory at most: waking one more first hibernates the least recently used idle one "
        "(0: no limit)",
        "N",
    ),
    Option(
        "--memory-high",
        memory_mark,
        "80%",
        "high-water mark of memory use (a percentage of the cgroup's memory.max, else of the machine's memory, "
        "or bytes): above it, idle objects hibernate, least recently used first (off: never)",
        "MARK",
    ),
    Option(
        "--memory-low",
        memory_mark,
        "70%",
        "low-water mark: how far memory-pressure eviction brings memory use down (like --memory-high)",
        "MARK",
    ),
    Option(
        "--memory-cgroup",
        _any_text,
        "auto",
        "the cgroup v2 directory whose memory.current and memory.max are read (auto: the process's own; "
        "off: the process's RSS)",
        "DIR",
    ),
    Option(
        "--warn-blocked",
        _non_negative_seconds,
        "0.5",
        "log a warning, with the stack, when a handler blocks the event loop this long (0: never)",
        "SECONDS",
    ),
    Option(
        "--lease-ttl",
        _positive_seconds,
        "10",
        "with PostgreSQL storage: how long a slot lease lasts without renewal; a process that cannot "
        "renew stops serving those objects within it, and another takes them over after it",
        "SECONDS",
    ),
    Option(
        "--lb-probe-timeout",
        _non_negative_seconds,
        "0",
        "with PostgreSQL storage: give this process's objects to the other members while no load balancer "
        "has asked its /readyz for this long (it cannot be reached); 0: never",
        "SECONDS",
    ),
    Option(
        "--member-name",
        _any_text,
        "",
        "with PostgreSQL storage: this process's name in the cluster, stable across restarts and the "
        "same as its server name in HAProxy (default: the host name and --port)",
        "NAME",
    ),
    Option(
        "--cluster-address",
        _cluster_address,
        "",
        "with PostgreSQL storage and --cluster-secret: the HOST:PORT at which the other members reach this "
        "one's application listener for calls between objects, called over TLS with --certfile (advertised "
        "as https://HOST:PORT) (default: --host and the bound port, unless --host listens on every interface)",
        "HOST:PORT",
    ),
    Option(
        "--cluster-secret",
        _any_text,
        "",
        "with PostgreSQL storage: the secret every member of the cluster shares, which signs the RPC and fetch "
        "calls between objects on different members (without it such calls are refused); never logged",
        "SECRET",
    ),
    Option(
        "--cluster-ca-file",
        _any_text,
        "",
        "PEM file of the CAs that the certificates of the other members' application listeners (--certfile) "
        "must be signed by, for calls between objects over TLS (empty: the system's)",
        "PATH",
    ),
    Option(
        "--cluster-call-timeout",
        _positive_seconds,
        "30",
        "how long a call to an object on another member may wait for its answer before it fails",
        "SECONDS",
    ),
    Option(
        "--route-key",
        _route_key,
        "",
        "with --haproxy-runtime: the part of a request HAProxy routes by (path:N, query:NAME or header:NAME)",
        "KEY",
    ),
    Option(
        "--haproxy-runtime",
        _any_text,
        "",
        "HAProxy runtime API addresses (HOST:PORT or a socket path, comma-separated) that a member teaches "
        "where a routing key's object lives",
        "ADDRS",
    ),
    Option(
        "--haproxy-map",
        _any_text,
        "/etc/haproxy/wsecho-owners.map",
        "the owners map file named in HAProxy's configuration (wsecho haproxy-config --map)",
        "PATH",
    ),
    Option(
        "--workers",
        _workers,
        "1",
        "worker processes sharing the port, each owning a share of the objects (auto: one per usable CPU)",
        "N",
    ),
    Option(
        "--loop",
        _choice("auto", "uvloop", "asyncio"),
        "auto",
        "event loop: uvloop (faster; the default when it is installed) or asyncio",
        "LOOP",
    ),
    Option("--log-level", _log_level, "info", f"one of {', '.join(LOG_LEVELS)}", "LEVEL"),
    Option("--log-format", _choice("text", "json"), "text", "text, or json (one object a line)", "FORMAT"),
    Option("--log-file", _any_text, "", "append logs to this file (SIGHUP re-opens it); default stderr", "PATH"),
    Option("--access-log", _switch, "on", "log every HTTP request: on or off", "on|off"),
)

#: Settings that SIGHUP applies to a running server; the others need a restart.
RELOADABLE = frozenset(
    {
        "hibernate_after",
        "log_level",
        "log_format",
        "log_file",
        "access_log",
        "drain_timeout",
        "certfile",
        "keyfile",
        "reload_code",
    }
)
#: Reloadable only while TLS stays on: turning it on or off needs a restart.
TLS_FILES = frozenset({"certfile", "keyfile"})


#: Each option's default, parsed: the one place :class:`Settings` takes its defaults from.
DEFAULTS: Mapping[str, Any] = MappingProxyType({opt.dest: opt.parse(opt.default) for opt in OPTIONS})


@attrs.frozen
class Settings:
    """The resolved options. A field per option, whose default is the option's (:data:`DEFAULTS`);
    the annotations are written out so mypy checks every use (a test keeps them in step with
    :data:`OPTIONS`)."""

    app: str = DEFAULT_APP
    host: str = DEFAULTS["host"]
    port: int = DEFAULTS["port"]
    hibernate_after: float = DEFAULTS["hibernate_after"]
    max_message_size: int = DEFAULTS["max_message_size"]
    data_dir: str = DEFAULTS["data_dir"]
    #: "sqlite", or a PostgreSQL URL (which may hold a password: show it through ``redact``).
    storage: str = DEFAULTS["storage"]
    max_connections: int = DEFAULTS["max_connections"]
    max_http_connections: int = DEFAULTS["max_http_connections"]
    max_body_memory: int = DEFAULTS["max_body_memory"]
    backlog: int = DEFAULTS["backlog"]
    allowed_origins: tuple[str, ...] = DEFAULTS["allowed_origins"]
    #: Empty: automatic (see ``AllowedHosts.for_listener``).
    allowed_hosts: tuple[str, ...] = DEFAULTS["allowed_hosts"]
    forwarded_allow_ips: TrustedProxies = DEFAULTS["forwarded_allow_ips"]
    handshake_timeout: float = DEFAULTS["handshake_timeout"]
    ping_interval: float = DEFAULTS["ping_interval"]
    ping_timeout: float = DEFAULTS["ping_timeout"]
    max_outgoing_total: int = DEFAULTS["max_outgoing_total"]
    compression: bool = DEFAULTS["compression"]
    admin_host: str = DEFAULTS["admin_host"]
    admin_port: int | None = DEFAULTS["admin_port"]
    drain_timeout: float = DEFAULTS["drain_timeout"]
    reload_code: bool = DEFAULTS["reload_code"]
    reload: bool = DEFAULTS["reload"]
    #: Empty (both): no TLS. The files are read when the server starts and on SIGHUP.
    certfile: str = DEFAULTS["certfile"]
    keyfile: str = DEFAULTS["keyfile"]
    admin_tls: bool = DEFAULTS["admin_tls"]
    max_object_storage: int | None = DEFAULTS["max_object_storage"]
    max_storage: int | None = DEFAULTS["max_storage"]
    max_sockets_per_object: int = DEFAULTS["max_sockets_per_object"]
    max_tags_per_socket: int = DEFAULTS["max_tags_per_socket"]
    max_tag_bytes: int = DEFAULTS["max_tag_bytes"]
    max_attachment_bytes: int = DEFAULTS["max_attachment_bytes"]
    max_auto_response_bytes: int = DEFAULTS["max_auto_response_bytes"]
    max_auto_responses: int = DEFAULTS["max_auto_responses"]
    max_event_timeout: int = DEFAULTS["max_event_timeout"]
    max_fanout_queue: int = DEFAULTS["max_fanout_queue"]
    max_outbound_per_object: int = DEFAULTS["max_outbound_per_object"]
    max_outbound: int = DEFAULTS["max_outbound"]
    outbound_connect_timeout: float = DEFAULTS["outbound_connect_timeout"]
    outbound_ca_file: str = DEFAULTS["outbound_ca_file"]
    max_active_objects: int = DEFAULTS["max_active_objects"]
    memory_high: Mark | None = DEFAULTS["memory_high"]
    memory_low: Mark | None = DEFAULTS["memory_low"]
    memory_cgroup: str = DEFAULTS["memory_cgroup"]
    warn_blocked: float = DEFAULTS["warn_blocked"]
    lease_ttl: float = DEFAULTS["lease_ttl"]
    lb_probe_timeout: float = DEFAULTS["lb_probe_timeout"]
    member_name: str = DEFAULTS["member_name"]
    cluster_address: str = DEFAULTS["cluster_address"]
    #: Not in repr(): settings may be logged, a secret must not be.
    cluster_secret: str = attrs.field(default=DEFAULTS["cluster_secret"], repr=False)
    cluster_call_timeout: float = DEFAULTS["cluster_call_timeout"]
    cluster_ca_file: str = DEFAULTS["cluster_ca_file"]
    route_key: str = DEFAULTS["route_key"]
    haproxy_runtime: str = DEFAULTS["haproxy_runtime"]
    haproxy_map: str = DEFAULTS["haproxy_map"]
    workers: int = DEFAULTS["workers"]
    loop: str = DEFAULTS["loop"]
    log_level: str = DEFAULTS["log_level"]
    log_format: str = DEFAULTS["log_format"]
    log_file: str = DEFAULTS["log_file"]
    access_log: bool = DEFAULTS["access_log"]
    config: str | None = None

    @property
    def limits(self) -> Limits:
        """The :class:`Limits` the runtime enforces, from the options that set them."""
        return Limits(**{opt.limit: getattr(self, opt.dest) for opt in OPTIONS if opt.limit})

    @property
    def logging_level(self) -> int:
        return int(getattr(logging, self.log_level.upper()))


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the message names the flag), exit status 2.

    argparse's own prints the whole usage first: about twenty lines in which the one that
    matters is the last."""

    def error(self, message: str) -> NoReturn:
        config_failure(f"{message} (wsecho --help lists the options)")


def config_failure(message: str) -> NoReturn:
    """Print one line, ``wsecho: error: MESSAGE``, and exit with status 2: bad configuration
    (a run-time failure, like a port already in use, exits with status 1)."""
    sys.stderr.write(f"wsecho: error: {message}\n")
    raise SystemExit(2)


def installed_version() -> str:
    """The version pip installed (setup.cfg takes it from ``wsecho.__version__``, a layer above)."""
    try:
        return importlib.metadata.version("wsecho")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: pip install the checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="wsecho",
        description=(
            "Serve a wsecho application: Durable Objects-style WebSocket hibernation on Tornado. "
            "Every option can also come from the environment variable named after it "
            "(WSECHO_PORT, WSECHO_HIBERNATE_AFTER, ...) or from a TOML file (--config) with keys "
            "named like the options (hibernate_after = 10). Precedence: flag, then variable, "
            "then file, then default."
        ),
    )
    parser.add_argument(
        "app",
        nargs="?",
        default=None,
        metavar="MODULE[:ATTR]",
        help=f"the application to serve, like uvicorn (MODULE alone means MODULE:app; "
        f"env WSECHO_APP; file key app; default: the built-in echo application, {DEFAULT_APP})",
    )
    parser.add_argument("--version", action="version", version=f"wsecho {installed_version()}")
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="read settings from this TOML file (env WSECHO_CONFIG; SIGHUP re-reads it)",
    )
    for opt in OPTIONS:
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            default=None,
            metavar=opt.metavar,
            # argparse formats help with %: a percentage (--memory-high 80%) must be doubled.
            help=f"{opt.help} (env {opt.env}; default {opt.default or 'none'})".replace("%", "%%"),
        )
    return parser


def load_config_file(path: str) -> dict[str, str]:
    """The settings in a TOML file, as strings for the option parsers; unknown keys are errors."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}", f"cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}", f"not valid TOML: {exc}") from None
    known = {opt.dest for opt in OPTIONS} | {"app"}
    values: dict[str, str] = {}
    for key, value in data.items():
        if key not in known:
            hint = key.replace("-", "_")
            extra = f" (did you mean {hint}?)" if hint in known else ""
            msg = f"unknown key {key!r}{extra}; known keys: {', '.join(sorted(known))}"
            raise ConfigError(path, msg)
        if isinstance(value, bool):
            values[key] = "on" if value else "off"
        elif isinstance(value, str | int | float):
            values[key] = str(value)
        else:
            raise ConfigError(f"{path}: {key}", f"must be a string, number or boolean, got {value!r}")
    return values


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Resolve each option: flag, else ``WSECHO_*`` variable, else config file, else default."""
    config_path = args.config or environ.get("WSECHO_CONFIG") or None
    file_values = load_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {
        "app": args.app or environ.get("WSECHO_APP") or file_values.get("app") or DEFAULT_APP,
        "config": config_path,
    }
    for opt in OPTIONS:
        given = getattr(args, opt.dest)
        source = opt.flag
        if given is None and opt.env in environ:
            given, source = environ[opt.env], f"{opt.env} (for {opt.flag})"
        if given is None and opt.dest in file_values:
            given, source = file_values[opt.dest], f"{config_path}: {opt.dest}"
        default = opt.default
        if opt.flag == "--data-dir" and environ.get("STATE_DIRECTORY"):
            # systemd's StateDirectory= (the first one, if it lists several)
            default = environ["STATE_DIRECTORY"].split(":")[0]
        try:
            values[opt.dest] = opt.parse(default if given is None else given)
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from None
    check_ports_differ(values["host"], values["port"], values["admin_host"], values["admin_port"])
    check_tls(values["certfile"], values["keyfile"], values["admin_tls"])
    checkmemory_marks(values["memory_high"], values["memory_low"])
    if values["haproxy_runtime"] and not values["route_key"]:
        raise ConfigError("--haproxy-runtime", "needs --route-key: the part of a request HAProxy routes by")
    if values["cluster_secret"] and not values["cluster_address"] and values["host"] in WILDCARD_HOSTS:
        msg = (
            f"--host {values['host']} listens on every interface, so the other members of the cluster cannot "
            "be told where to reach this one: give --cluster-address HOST:PORT (an address they can reach)"
        )
        raise ConfigError("--cluster-address", msg)
    if values["certfile"] and values["cluster_address"].startswith("http://"):
        msg = (
            f"{values['cluster_address']} is plain HTTP, but with --certfile the application listener takes "
            "only TLS: give https://HOST:PORT, or HOST:PORT (advertised as https://HOST:PORT)"
        )
        raise ConfigError("--cluster-address", msg)
    if values["workers"] > 1 and values["certfile"]:
        msg = (
            f"{values['workers']} with --certfile: a TLS connection cannot move to the worker that owns its "
            "object; terminate TLS at a proxy in front of the workers (docs/deploying.md) or run one worker"
        )
        raise ConfigError("--workers", msg)
    return Settings(**values)


#: Addresses that listen on every interface, and so overlap any other address on the same port.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})


def check_ports_differ(host: str, port: int, admin_host: str, admin_port: int | None) -> None:
    """The admin listener never shares the application's port: say so before binding fails."""
    if admin_port is None or admin_port == 0 or admin_port != port:
        return
    if host == admin_host or host in WILDCARD_HOSTS or admin_host in WILDCARD_HOSTS:
        where = admin_host if admin_host == host else f"{host} and {admin_host}"
        msg = f"must differ from --port {port}: the application and the admin listener cannot share {where} port {port}"
        raise ConfigError("--admin-port", msg)


def checkmemory_marks(high: Mark | None, low: Mark | None) -> None:
    """The low-water mark is below the high one when both are the same kind (a mixed pair is
    checked against each reading: a low mark above the high one counts as the high one)."""
    if high is not None and low is not None and high.percent == low.percent and low.value > high.value:
        msg = f"{low} is above --memory-high {high}: memory-pressure eviction brings memory use down to it"
        raise ConfigError("--memory-low", msg)


def check_tls(certfile: str, keyfile: str, admin_tls: bool) -> None:
    """TLS needs both files or neither; the admin listener's TLS needs them."""
    if bool(certfile) != bool(keyfile):
        given, missing = ("--certfile", "--keyfile") if certfile else ("--keyfile", "--certfile")
        msg = f"{given} is set but {missing} is not: TLS needs both (or neither, for plain HTTP)"
        raise ConfigError("--certfile/--keyfile", msg)
    if admin_tls and not certfile:
        raise ConfigError("--admin-tls", "on needs --certfile and --keyfile (the admin listener uses the same ones)")


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[Settings, argparse.Namespace]:
    """Parse ``argv``; on a bad value print the usage and the error, and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return settings_from(args, environ), args
    except ConfigError as exc:
        config_failure(str(exc))
