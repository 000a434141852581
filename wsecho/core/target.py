"""Where a request is aimed: its Host, its request-target, and whether this server answers to it.

Sans-IO: both listeners (the application's gateway and the admin listener) hand the
request line and the Host field lines to :func:`resolve`, which returns the
:class:`Target` or raises :class:`~wsecho.core.errors.BadRequestError` with the status and
a message that names the rule. The rules are RFC 9112 §3.2 (exactly one valid Host),
§3.2.1-3.2.4 (the four forms of request-target) and RFC 3986 §3.2.2 (host and port).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re

import attrs

from wsecho.core.errors import BadRequestError

#: RFC 3986 §3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims ); an IPv4 address is one too.
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_REG_NAME_CHAR = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]")
#: The names a listener always answers to: a request for them never comes from DNS rebinding
#: (a rebound page keeps the attacker's name in its Host). ``.localhost`` is RFC 6761's.
LOOPBACK_HOSTS = ("localhost", ".localhost", "127.0.0.1", "[::1]")


@attrs.frozen
class Target:
    """The authority (``host[:port]``) and the path (with the query) a request is aimed at."""

    authority: str
    #: Lower case, without the port and a trailing dot: what the allow-list is checked against.
    host: str
    path: str


def split_authority(text: str, what: str) -> tuple[str, str]:
    """``(host, port)`` of an RFC 3986 authority without userinfo; ``what`` names it in errors."""
    if text.startswith("["):
        literal, bracket, port = text[1:].partition("]")
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            address = None
        if not bracket or address is None:
            msg = f"{what} {text!r} is not a valid host: an IPv6 address in brackets must be like [::1]"
            raise BadRequestError(400, msg)
        host = f"[{address.compressed}]"
    else:
        host = text.partition(":")[0]
        port = text[len(host) :]
        if not _REG_NAME.fullmatch(host):
            bad = next((c for c in host if not _REG_NAME_CHAR.match(c)), None)
            why = f"it contains {bad!r}" if bad is not None else "a host must be a name or an address"
            msg = f"{what} {text!r} is not a valid host[:port]: {why}"
            raise BadRequestError(400, msg)
    digits = port[1:]
    if port and (not port.startswith(":") or (digits and not _valid_port(digits))):
        msg = f"{what} {text!r} is not a valid host[:port]: the port must be a number from 0 to 65535"
        raise BadRequestError(400, msg)
    return host.lower().rstrip("."), digits


def _valid_port(digits: str) -> bool:
    # str.isdigit alone accepts "²"; ASCII digits only, and int() of a short string only.
    return digits.isascii() and digits.isdigit() and len(digits) <= 5 and int(digits) <= 65535


def normalize_host(entry: str) -> str:
    """One ``--allowed-hosts`` entry as :func:`resolve` compares it: ``*``, ``.domain`` or a host.

    Raises ``ValueError`` naming the entry (``BadRequestError`` is one).
    """
    entry = entry.strip().lower()
    if entry == "*":
        return entry
    suffix = entry.startswith(".")
    try:
        ipaddress.IPv6Address(entry)
    except ValueError:
        pass
    else:
        entry = f"[{entry}]"  # an IPv6 address without its brackets
    host, port = split_authority(entry[1:] if suffix else entry, "the host")
    if port or ":" in entry.rpartition("]")[2]:
        msg = f"{entry!r} must be a host without a port"
        raise ValueError(msg)
    return f".{host}" if suffix else host


@attrs.frozen
class AllowedHosts:
    """The Host names a listener answers to (DNS rebinding: RFC 9110 §7.4's 421 for the others)."""

    names: frozenset[str]
    #: ``.example.com`` entries: the domain and every name under it.
    domains: tuple[str, ...]
    any: bool = False

    @classmethod
    def for_listener(cls, configured: tuple[str, ...], bind_host: str) -> AllowedHosts:
        """``configured`` (normalized entries; empty: automatic) for a listener on ``bind_host``.

        Automatic is the loopback names on a loopback address, any host on another one: DNS
        rebinding is how a web page reaches a server that only the victim's machine can reach,
        and a server bound to a public address answers anyone already. A listener also always
        answers to the loopback names and to its own address.
        """
        if not configured and not is_loopback(bind_host):
            configured = ("*",)
        entries = {*LOOPBACK_HOSTS, *configured}
        with contextlib.suppress(ValueError):  # a bind address that is not a host adds nothing
            entries.add(normalize_host(bind_host))
        entries -= {"[::]", "0.0.0.0"}  # an unspecified address is nobody's Host
        return cls(
            names=frozenset(e for e in entries if not e.startswith(".") and e != "*"),
            domains=tuple(sorted(e for e in entries if e.startswith("."))),
            any="*" in entries,
        )

    def allows(self, host: str) -> bool:
        if self.any or host in self.names:
            return True
        return any(host.endswith(d) or host == d[1:] for d in self.domains)


def is_loopback(bind_host: str) -> bool:
    """Whether a listener on ``bind_host`` is reachable only from this machine."""
    name = bind_host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def resolve(
    method: str, target: str, version: str, host_fields: list[str], allowed: AllowedHosts, local: str
) -> Target:
    """The :class:`Target` of a request; ``local`` is the authority for an HTTP/1.0 one without Host."""
    if len(host_fields) > 1:
        msg = f"Bad Request: {len(host_fields)} Host headers; a request must have exactly one (RFC 9112 §3.2)"
        raise BadRequestError(400, msg)
    if not host_fields and version != "HTTP/1.0":
        msg = f"Bad Request: no Host header; an {version} request must have one (RFC 9112 §3.2)"
        raise BadRequestError(400, msg)
    authority = host_fields[0].strip() if host_fields else local
    host, _ = split_authority(authority, "Bad Request: the Host header")
    named = bool(host_fields)  # by the client, not by us (an HTTP/1.0 request without Host)
    if target.startswith("/"):
        path = target
    elif target == "*" and method == "OPTIONS":
        path = ""  # RFC 9112 §3.2.4: the asterisk-form's target URI has an empty path
    else:
        authority, host, path = _absolute_form(target)
        named = True
    if named and not allowed.allows(host):
        msg = f"Misdirected Request: this server does not answer to the host {host!r} (see --allowed-hosts)"
        raise BadRequestError(421, msg)
    return Target(authority, host, path)


def _absolute_form(target: str) -> tuple[str, str, str]:
    """The authority, host and path of an absolute-form request-target (``http://host/path``)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        msg = (
            f"Bad Request: the request target {target[:100]!r} must be a path starting with / "
            "(or an http:// URL, or * for OPTIONS)"
        )
        raise BadRequestError(400, msg)
    # RFC 9112 §3.2.2: with an absolute-form target the Host header is ignored and the
    # authority comes from the target, and so does the path.
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if "@" in authority:
        msg = f"Bad Request: the request target {target[:100]!r} has user information (RFC 9110 §4.2.4)"
        raise BadRequestError(400, msg)
    host, _ = split_authority(authority, "Bad Request: the request target's host")
    return authority, host, path if path.startswith("/") else "/" + path
