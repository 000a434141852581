"""Who the client is behind a reverse proxy: ``--forwarded-allow-ips`` and ``X-Forwarded-*``.

Sans-IO: the gateway hands over the TCP peer's address and the request's ``X-Forwarded-For``
and ``X-Forwarded-Proto`` field lines; :meth:`TrustedProxies.client` returns the address and
scheme the application and the access log get. A forwarded header is only a claim, and
anyone can send one: it counts only when the TCP peer is a proxy the operator named. Then the
client is the right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy
(each proxy appends the address it saw; the entries to its left are whatever the client
wrote), as uvicorn, gunicorn and nginx's ``real_ip_recursive`` do.
"""

from __future__ import annotations

import ipaddress

import attrs

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The schemes X-Forwarded-Proto may set for ``request.url`` (others are ignored).
SCHEMES = ("http", "https")


@attrs.frozen
class TrustedProxies:
    """The proxies whose forwarded headers are believed (empty: none, the default)."""

    networks: tuple[IPNetwork, ...] = ()
    #: ``*``: every peer is a trusted proxy (only when nothing but proxies can reach the server).
    any: bool = False

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """Comma-separated addresses and CIDR networks, or ``*``; ``ValueError`` names a bad entry."""
        networks: list[IPNetwork] = []
        any_peer = False
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            if entry == "*":
                any_peer = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                msg = f"each entry must be an IP address, a CIDR network like 10.0.0.0/8, or *, got {entry!r}"
                raise ValueError(msg) from None
        return cls(tuple(networks), any_peer)

    def __bool__(self) -> bool:
        return self.any or bool(self.networks)

    def trusts(self, address: str) -> bool:
        if self.any:
            return True
        ip = _address(address)
        return ip is not None and _within(ip, self.networks)

    def client(self, peer: str, forwarded_for: list[str], forwarded_proto: list[str], scheme: str) -> tuple[str, str]:
        """``(address, scheme)`` of the client, from the TCP ``peer`` and the request's field lines.

        From a peer that is not trusted the forwarded fields are ignored. From a trusted one,
        the address is the right-most ``X-Forwarded-For`` entry that is not a trusted proxy;
        when every entry is one (``*``), the left-most, the farthest hop named. The walk stops
        at an entry that is not an address (``unknown``, garbage): what lies left of it cannot
        be placed, so the last good hop is the client. The scheme is the right-most
        ``X-Forwarded-Proto`` value (the nearest proxy's), if it is http or https.
        """
        if not self or not self.trusts(peer):
            return peer, scheme
        client = peer
        hops = [hop.strip() for line in forwarded_for for hop in line.split(",")]
        for hop in reversed(hops):
            ip = _address(hop)
            if ip is None:
                break
            client = ip.compressed
            if not (self.any or _within(ip, self.networks)):
                break
        protos = [p.strip().lower() for line in forwarded_proto for p in line.split(",") if p.strip()]
        if protos and protos[-1] in SCHEMES:
            scheme = protos[-1]
        return client, scheme


def _within(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def _address(text: str) -> IPAddress | None:
    """The address of an ``X-Forwarded-For`` entry or a peer: ``1.2.3.4``, ``::1``, ``[::1]``,
    with or without a port (``1.2.3.4:5678``, ``[::1]:5678``, as some proxies write them)."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 peer on a dual-stack socket reads ::ffff:1.2.3.4; match it against IPv4 entries.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
