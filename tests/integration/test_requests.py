"""What the server accepts as a request before the application sees it: the method and version
of an upgrade, the Host and the request-target, the allowed hosts, /objects' query, and the
close-code metric's labels. Raw sockets send the exact bytes."""

import json
import re
from urllib.parse import urlsplit

import pytest

from tests.helpers import Probe, RawClient, Recorder, probe_worker
from tests.integration.test_bad_input import KEY, http_exchange
from wsecho import App, Response
from wsecho.core.errors import ConfigError
from wsecho.core.target import AllowedHosts
from wsecho.serve.config import Settings, build_parser, settings_from
from wsecho.serve.gateway import make_application
from wsecho.serve.metrics import make_registry, render
from wsecho.serve.server import Server


async def url_worker(request, env):
    """``/url...`` answers with the ``request.url`` the application sees; the rest is the probe's."""
    if urlsplit(request.url).path.startswith("/url"):
        env.REC.record("url", request.url)
        return Response(request.url)
    return await probe_worker(request, env)


def url_app(recorder):
    return App(fetch=url_worker, bindings={"PROBE": Probe}, vars={"REC": recorder, "FLAGS": {}})


@pytest.fixture
def wsecho_app(recorder):
    return url_app(recorder)


@pytest.fixture
def app(runtime):
    return make_application(runtime, max_message_size=1000, allowed_hosts=AllowedHosts.for_listener((), "127.0.0.1"))


def get(target="/url", host="127.0.0.1", method="GET", version="HTTP/1.1", extra=""):
    host_line = "" if host is None else f"Host: {host}\r\n"
    return f"{method} {target} {version}\r\n{host_line}{extra}\r\n".encode()


def upgrade(method="GET", version="HTTP/1.1", path="/obj/x/ws", host="127.0.0.1"):
    return (
        f"{method} {path} {version}\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def status_and_body(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


# -- L2: an upgrade is GET over HTTP/1.1 -------------------------------------------------------


@pytest.mark.parametrize("method", ["FOO", "POST", "PUT"])
@pytest.mark.gen_test
async def test_an_upgrade_with_another_method_is_400(port, runtime, method):
    status, body = status_and_body(await http_exchange(port, upgrade(method=method)))
    assert status == 400
    assert body == f"Bad WebSocket handshake: the method must be GET, got {method}"
    assert runtime.socket_count() == 0  # the socket the object accepted was dropped


@pytest.mark.gen_test
async def test_an_upgrade_over_http_1_0_is_400(port, runtime):
    status, body = status_and_body(await http_exchange(port, upgrade(version="HTTP/1.0")))
    assert status == 400
    assert body == "Bad WebSocket handshake: the request must be HTTP/1.1, got HTTP/1.0"
    assert runtime.socket_count() == 0


@pytest.mark.gen_test
async def test_a_post_without_upgrade_still_reaches_the_application(port, recorder):
    answer = await http_exchange(port, get(method="POST", extra="Content-Length: 0\r\n"))
    assert status_and_body(answer)[0] == 200
    assert recorder.of("url") == [("url", "http://127.0.0.1/url")]


# -- L3: exactly one valid Host; the request-target --------------------------------------------


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("127.0.0.1/obj/private/ws?", "it contains '/'"),
        ("127.0.0.1?x", "it contains '?'"),
        ("127.0.0.1#x", "it contains '#'"),
        ("user@127.0.0.1", "it contains '@'"),
        ("local host", "it contains ' '"),
        ("", "a host must be a name or an address"),
        ("127.0.0.1:99999", "the port must be a number from 0 to 65535"),
        ("127.0.0.1:8x", "the port must be a number from 0 to 65535"),
        ("[::1", "an IPv6 address in brackets must be like [::1]"),
        ("[not-v6]:80", "an IPv6 address in brackets must be like [::1]"),
    ],
)
@pytest.mark.gen_test
async def test_a_bad_host_header_is_400_and_never_reaches_the_application(port, recorder, host, why):
    status, body = status_and_body(await http_exchange(port, get("/obj/public/ws", host=host)))
    assert status == 400
    assert body.startswith(f"Bad Request: the Host header {host!r} is not a valid host")
    assert body.endswith(why)
    assert recorder.events == []


@pytest.mark.gen_test
async def test_a_host_cannot_steer_the_path_into_another_room(port, recorder):
    """The red team's case: path /obj/public/ws, Host naming the path of the private room."""
    status, _ = status_and_body(await http_exchange(port, upgrade(path="/obj/public/ws", host="x/obj/private/ws?")))
    assert status == 400
    assert recorder.of("constructor") == []


@pytest.mark.gen_test
async def test_two_host_headers_are_400(port, recorder):
    answer = await http_exchange(port, get(extra="Host: evil.example\r\n"))
    assert status_and_body(answer) == (
        400,
        "Bad Request: 2 Host headers; a request must have exactly one (RFC 9112 §3.2)",
    )
    assert recorder.events == []


@pytest.mark.gen_test
async def test_http_1_1_without_host_is_400_and_http_1_0_gets_the_local_address(port, recorder):
    answer = await http_exchange(port, get(host=None))
    assert status_and_body(answer) == (
        400,
        "Bad Request: no Host header; an HTTP/1.1 request must have one (RFC 9112 §3.2)",
    )
    answer = await http_exchange(port, get(host=None, version="HTTP/1.0"))
    assert status_and_body(answer) == (200, f"http://127.0.0.1:{port}/url")


@pytest.mark.parametrize(
    ("target", "host", "url"),
    [
        ("/url/a?b=c", "127.0.0.1:{port}", "http://127.0.0.1:{port}/url/a?b=c"),
        ("/url", "LOCALHOST.", "http://LOCALHOST./url"),
        ("/url", "[::1]:{port}", "http://[::1]:{port}/url"),
        # absolute-form: the authority and the path come from the target; Host is ignored
        ("http://localhost:{port}/url/x?q=1", "127.0.0.1", "http://localhost:{port}/url/x?q=1"),
        ("HTTP://127.0.0.1/url?q", "127.0.0.1", "http://127.0.0.1/url?q"),
    ],
)
@pytest.mark.gen_test
async def test_the_url_the_application_sees(port, target, host, url):
    answer = await http_exchange(port, get(target.format(port=port), host=host.format(port=port)))
    assert status_and_body(answer) == (200, url.format(port=port))


@pytest.mark.gen_test
async def test_options_asterisk_reaches_the_application_with_an_empty_path(port, recorder):
    answer = await http_exchange(port, get("*", method="OPTIONS"))
    assert status_and_body(answer)[0] == 200  # the probe worker answers; it saw the bare authority
    assert [e for e in recorder.events if e[0] == "constructor"] == [("constructor", "default", 0)]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("url", "the request target 'url' must be a path starting with /"),
        ("*", "the request target '*' must be a path starting with /"),  # * is for OPTIONS only
        ("ftp://127.0.0.1/url", "the request target 'ftp://127.0.0.1/url' must be a path starting with /"),
        ("127.0.0.1:80", "the request target '127.0.0.1:80' must be a path starting with /"),
        ("http://user@127.0.0.1/url", "has user information"),
        ("http://127.0.0.1/x/url", None),  # fine: 200 from the probe
        ("http://evil.example/url", "does not answer to the host 'evil.example'"),
        ("http://127.0.0.1http://evil.example/url", "does not answer to the host '127.0.0.1http'"),
    ],
)
@pytest.mark.gen_test
async def test_request_targets_that_are_not_a_path(port, recorder, target, message):
    status, body = status_and_body(await http_exchange(port, get(target)))
    if message is None:
        assert status == 200
        return
    assert status in (400, 421)
    assert message in body
    assert recorder.of("url") == []


# -- L4: allowed hosts (DNS rebinding) ---------------------------------------------------------


@pytest.mark.gen_test
async def test_a_host_that_is_not_allowed_is_421_before_the_application(port, recorder):
    for request in (get(host="evil.example:8787"), upgrade(host="evil.example")):
        status, body = status_and_body(await http_exchange(port, request))
        assert status == 421
        assert body == (
            "Misdirected Request: this server does not answer to the host 'evil.example' (see --allowed-hosts)"
        )
    assert recorder.events == []


@pytest.mark.parametrize("host", ["localhost", "localhost:1", "app.localhost", "127.0.0.1", "[::1]", "[0::1]:9"])
@pytest.mark.gen_test
async def test_loopback_names_are_allowed_on_a_loopback_listener(port, host):
    assert status_and_body(await http_exchange(port, get(host=host)))[0] == 200


def test_allowed_hosts_for_a_listener():
    loopback = AllowedHosts.for_listener((), "127.0.0.5")
    assert not loopback.any
    assert loopback.allows("127.0.0.5")
    assert loopback.allows("localhost")
    assert not loopback.allows("evil.example")
    assert not loopback.allows("localhost.evil.example")
    # bound to any other address, the automatic list takes any host (the server is reachable anyway)
    assert AllowedHosts.for_listener((), "0.0.0.0").allows("evil.example")
    assert AllowedHosts.for_listener((), "192.0.2.7").allows("evil.example")
    assert AllowedHosts.for_listener((), "::").allows("evil.example")
    configured = AllowedHosts.for_listener(("app.example", ".example.org"), "0.0.0.0")
    assert configured.allows("app.example")
    assert configured.allows("example.org")
    assert configured.allows("chat.example.org")
    assert configured.allows("localhost")
    assert not configured.allows("sub.app.example")
    assert not configured.allows("evil.example")
    assert not configured.allows("0.0.0.0")
    assert AllowedHosts.for_listener(("*",), "127.0.0.1").allows("evil.example")


def parse(argv, environ=None):
    return settings_from(build_parser().parse_args(argv), environ or {})


def test_allowed_hosts_option():
    assert parse([]).allowed_hosts == ()
    assert parse(["--allowed-hosts", "auto"]).allowed_hosts == ()
    assert parse(["--allowed-hosts", "App.Example, .example.org,::1,*"]).allowed_hosts == (
        "app.example",
        ".example.org",
        "[::1]",
        "*",
    )
    assert parse([], {"WSECHO_ALLOWED_HOSTS": "a.example"}).allowed_hosts == ("a.example",)
    for bad, message in [
        ("x/y", "it contains '/'"),
        ("a.example:80", "'a.example:80' must be a host without a port"),
    ]:
        with pytest.raises(ConfigError, match="--allowed-hosts: .*" + re.escape(message)):
            parse(["--allowed-hosts", bad])


@pytest.fixture
def served(io_loop):
    """A Server on 127.0.0.1 with its admin listener, and a recorder of what the application saw."""
    servers = []

    async def start(**settings):
        recorder = Recorder()
        server = Server(url_app(recorder), Settings(port=0, admin_port=0, data_dir=":memory:", **settings))
        await server.start()
        servers.append(server)
        return server, recorder

    yield start
    for server in servers:
        io_loop.run_sync(server.stop)


@pytest.mark.gen_test
async def test_server_and_admin_listener_refuse_other_hosts_by_default(served):
    server, recorder = await served()
    assert status_and_body(await http_exchange(server.port, get(host="rebound.example")))[0] == 421
    assert status_and_body(await http_exchange(server.port, get(host=f"localhost:{server.port}")))[0] == 200
    for path in ("/metrics", "/objects", "/healthz", "/nope"):
        status, body = status_and_body(await http_exchange(server.admin_port, get(path, host="rebound.example")))
        assert (status, body) == (
            421,
            "Misdirected Request: this server does not answer to the host 'rebound.example' (see --allowed-hosts)\n",
        )
    assert status_and_body(await http_exchange(server.admin_port, get("/healthz", host="localhost"))) == (200, "ok\n")
    assert status_and_body(await http_exchange(server.admin_port, get("/healthz", host="a b")))[0] == 400
    assert status_and_body(await http_exchange(server.admin_port, get("/nope")))[0] == 404
    assert recorder.of("url") == [("url", f"http://localhost:{server.port}/url")]


@pytest.mark.gen_test
async def test_allowed_hosts_setting_adds_names(served):
    server, _ = await served(allowed_hosts=("chat.example",))
    assert status_and_body(await http_exchange(server.port, get(host="chat.example")))[0] == 200
    assert status_and_body(await http_exchange(server.port, get(host="other.example")))[0] == 421
    raw = await RawClient.connect(server.port, "/obj/x/ws")  # Host: 127.0.0.1:port
    assert raw.status == 101
    raw.abort()


# -- L5: /objects' query -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=%C2%B2", "limit must be a whole number from 0 to 10000, got '²'"),
        ("limit=" + "9" * 5000, "limit must be a whole number from 0 to 10000, got '99999999999999999999'"),
        ("limit=10001", "limit must be a whole number from 0 to 10000, got '10001'"),
        ("limit=-1", "limit must be a whole number from 0 to 10000, got '-1'"),
        ("limit=x", "limit must be a whole number from 0 to 10000, got 'x'"),
        ("state=sleeping", "state must be one of active, hibernating, waking, got 'sleeping'"),
    ],
)
@pytest.mark.gen_test
async def test_objects_query_is_validated(served, query, message):
    server, _ = await served()
    answer = await http_exchange(server.admin_port, get(f"/objects?{query}", host="localhost"))
    assert status_and_body(answer) == (400, message + "\n")


@pytest.mark.gen_test
async def test_objects_lists_at_most_limit_and_counts_the_rest(served):
    server, _ = await served()
    for i in range(12):
        await server.runtime.env.PROBE.get_by_name(f"o{i}").fetch("http://localhost/obj/o/count")

    async def objects(query):
        answer = await http_exchange(server.admin_port, get(f"/objects?{query}", host="localhost"))
        status, body = status_and_body(answer)
        assert status == 200
        return json.loads(body)

    data = await objects("limit=5&state=active")
    assert (data["count"], data["shown"], len(data["objects"])) == (12, 5, 5)
    data = await objects("limit=0")
    assert (data["count"], data["shown"], data["objects"]) == (12, 0, [])
    data = await objects("state=hibernating")
    assert (data["count"], data["shown"]) == (0, 0)


# -- L8: the close-code label is bounded -------------------------------------------------------


def closed_series(text):
    return re.findall(r"^wsecho_sockets_closed_total\{(.*)\} (\S+)$", text, re.M)


@pytest.mark.gen_test
async def test_close_codes_from_peers_share_one_series_per_range(served):
    server, _ = await served()
    for code in (4000, 4001, 4999, 3000, 3999, 1000):
        raw = await RawClient.connect(server.port, f"/obj/c{code}/ws")
        raw.send_close(code)
        await raw.read_close()
        await raw.wait_closed()
    series = dict(closed_series(render(server.registry).decode()))
    assert series == {
        'code="1000",name="normal_closure"': "1.0",
        'code="3000-3999",name="registered"': "2.0",
        'code="4000-4999",name="private_use"': "3.0",
    }


def test_two_thousand_distinct_codes_make_a_bounded_number_of_series(runtime):
    stats = runtime.stats
    for code in [*range(1000, 1016), *range(3000, 5000), 0, 2999, 5000, 65535]:
        stats.count_close(code)
    assert len(stats.closed_by_code) == 19  # 16 registered, 2 ranges, other
    assert stats.closed_by_code[("4000-4999", "private_use")] == 1000
    assert stats.closed_by_code[("other", "other")] == 4
    text = render(make_registry(runtime, lambda: 0.0)).decode()
    assert len(closed_series(text)) == 19


def test_the_take_over_checks_the_tornado_internals_it_reads():
    # Issue 12: a renamed Tornado field must fail loudly at import, naming the field,
    # instead of every upgrade failing quietly as if the client had left.
    import tornado.tcpserver
    from tornado.iostream import IOStream

    from wsecho.serve.takeover import check_tornado

    check_tornado()  # the installed Tornado has them all

    class RenamedServer(tornado.tcpserver.TCPServer):
        def __init__(self):
            super().__init__()
            del self._handlers

    class RenamedStream(IOStream):
        def __init__(self, sock):
            super().__init__(sock)
            del self._read_buffer_size
            del self._total_write_done_index

    with pytest.raises(
        ImportError,
        match=r"TCPServer\._handlers, IOStream\._read_buffer_size, IOStream\._total_write_done_index; found Tornado 6",
    ):
        check_tornado(RenamedServer, RenamedStream)
    with pytest.raises(ImportError, match=r"found Tornado 7\.0"):
        check_tornado(version=(7, 0))
