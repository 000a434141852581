"""The client's address behind trusted proxies: --forwarded-allow-ips and X-Forwarded-*."""

import pytest

from wsecho.core.forwarded import TrustedProxies

LOCAL = TrustedProxies.parse("127.0.0.1")


def test_nothing_is_trusted_by_default():
    nobody = TrustedProxies.parse("")
    assert not nobody
    assert nobody.client("127.0.0.1", ["203.0.113.9"], ["https"], "http") == ("127.0.0.1", "http")


@pytest.mark.parametrize(
    ("text", "trusted", "untrusted"),
    [
        ("127.0.0.1", ["127.0.0.1", "::ffff:127.0.0.1"], ["127.0.0.2", "::1"]),
        ("10.0.0.0/8, ::1", ["10.1.2.3", "::1", "[::1]"], ["11.0.0.1", "::2"]),
        ("fd00::/8", ["fd12::1"], ["fe80::1", "10.0.0.1"]),
        ("10.1.2.3/8", ["10.200.0.1"], ["11.0.0.1"]),  # host bits are dropped, as uvicorn does
        ("*", ["192.0.2.1", "::1", "anything"], []),
    ],
)
def test_trusted_entries_are_addresses_networks_or_a_star(text, trusted, untrusted):
    proxies = TrustedProxies.parse(text)
    assert all(proxies.trusts(a) for a in trusted)
    assert not any(proxies.trusts(a) for a in untrusted)


@pytest.mark.parametrize("text", ["localhost", "10.0.0.0/33", "1.2.3", "127.0.0.1:80"])
def test_a_bad_entry_is_named(text):
    with pytest.raises(ValueError, match=f"got '{text}'") as info:
        TrustedProxies.parse(f"127.0.0.1,{text}")
    assert "CIDR network" in str(info.value)


@pytest.mark.parametrize(
    ("proxies", "forwarded_for", "client"),
    [
        # Each proxy appends what it saw; the left of the header is the client's own claim.
        (LOCAL, ["203.0.113.9"], "203.0.113.9"),
        (LOCAL, ["198.51.100.1, 203.0.113.9"], "203.0.113.9"),
        (LOCAL, ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),  # HAProxy adds a field line
        (TrustedProxies.parse("127.0.0.1,10.0.0.0/8"), ["198.51.100.1, 203.0.113.9, 10.0.0.7"], "203.0.113.9"),
        (TrustedProxies.parse("*"), ["198.51.100.1, 203.0.113.9"], "198.51.100.1"),
        (LOCAL, ["127.0.0.1"], "127.0.0.1"),  # every hop trusted: the farthest
        (LOCAL, [""], "127.0.0.1"),
        (LOCAL, [], "127.0.0.1"),
        (LOCAL, ["unknown"], "127.0.0.1"),
        (TrustedProxies.parse("127.0.0.1,10.0.0.0/8"), ["203.0.113.9, unknown, 10.0.0.7"], "10.0.0.7"),
        (LOCAL, ["[2001:db8::1]:4711"], "2001:db8::1"),
        (LOCAL, ["203.0.113.9:4711"], "203.0.113.9"),
        (LOCAL, ["2001:DB8:0::1"], "2001:db8::1"),
    ],
)
def test_the_client_is_the_right_most_address_that_is_not_a_trusted_proxy(proxies, forwarded_for, client):
    assert proxies.client("127.0.0.1", forwarded_for, [], "http") == (client, "http")


def test_an_untrusted_peer_gets_nothing_it_claims():
    assert LOCAL.client("192.0.2.1", ["203.0.113.9"], ["https"], "http") == ("192.0.2.1", "http")


@pytest.mark.parametrize(
    ("forwarded_proto", "scheme"),
    [(["https"], "https"), (["HTTPS"], "https"), (["http, https"], "https"), (["wss"], "http"), ([], "http")],
)
def test_the_scheme_is_the_nearest_proxys_if_it_is_http_or_https(forwarded_proto, scheme):
    assert LOCAL.client("127.0.0.1", [], forwarded_proto, "http") == ("127.0.0.1", scheme)
