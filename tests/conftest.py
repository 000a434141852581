import asyncio
import shutil
import ssl
import tempfile
import types
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop

from tests.helpers import Recorder
from wsecho.examples import echo
from wsecho.runtime.runtime import Runtime
from wsecho.serve.gateway import make_application
from wsecho.serve.mount import Mount
from wsecho.testing import FakeClock

MAX_MESSAGE = 64 * 1024


@pytest.fixture
def io_loop():
    """pytest-tornado's ``io_loop`` (which this overrides) without Tornado's deprecated calls.

    pytest-tornado 0.8.1, its last release, builds the loop with ``IOLoop()``, which asks
    asyncio for the current loop (Python 3.12 and 3.13 warn "There is no current event loop";
    3.14 raises), then calls ``make_current()`` and ``clear_current()`` (deprecated since
    Tornado 6.2). This is what Tornado's own ``AsyncTestCase`` does instead: a new loop that
    is made current through asyncio, and taken away again after the test.
    """
    loop = IOLoop(make_current=False)
    asyncio.set_event_loop(loop.asyncio_loop)  # type: ignore[attr-defined]
    yield loop
    asyncio.set_event_loop(None)
    loop.close(all_fds=True)


@pytest.fixture
def clock():
    """The runtime's clocks: ``clock.monotonic() + 10`` is ten seconds from now."""
    return FakeClock(start=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


@pytest.fixture
def recorder():
    """Collects what test objects saw (they reach it as env.REC)."""
    return Recorder()


@pytest.fixture
def wsecho_app():
    """The wsecho.App under test; modules override this fixture."""
    return echo.app


@pytest.fixture
def runtime(wsecho_app, clock):
    return Runtime(wsecho_app, clock=clock.monotonic, wall_clock=clock.now, hibernate_after=10.0)


def pytest_generate_tests(metafunc):
    # The ways of serving a module's tests run over: the standalone server's gateway, and
    # (where the module lists them in SERVINGS) the objects mounted in a Tornado application
    # and the standalone gateway over TLS (wss://, https://).
    if "serving" in metafunc.fixturenames:  # through app, which url and port name
        servings = getattr(metafunc.module, "SERVINGS", ("standalone",))
        if metafunc.definition.get_closest_marker("standalone_only"):
            servings = ("standalone",)
        if metafunc.definition.get_closest_marker("mounted_only"):
            servings = ("tornado",)
        metafunc.parametrize("serving", servings)


@pytest.fixture
def app(runtime, serving):
    """The Tornado application pytest-tornado serves on 127.0.0.1:http_port."""
    if serving == "tornado":  # (the "tls" way serves the standalone gateway over TLS)
        mount = Mount(runtime.app, runtime=runtime, sweeper=False)
        return tornado.web.Application(mount.routes(), websocket_max_message_size=MAX_MESSAGE)
    return make_application(runtime, max_message_size=MAX_MESSAGE)


class TLSPort(int):
    """The test server's port, with the client context that trusts its certificate."""

    tls: ssl.SSLContext | None = None


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    """A CA of the tests' own and a certificate for 127.0.0.1 (the "tls" way of serving)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return types.SimpleNamespace(server=server, client=client, path=str(path))


@pytest.fixture
def http_server(request, io_loop, _unused_port, app, serving, test_ca, monkeypatch):
    """pytest-tornado's ``http_server`` (which this overrides), over TLS for the "tls" way.

    Clients built with the default SSL context (websockets' ``connect("wss://...")``) trust
    the test CA through ``SSL_CERT_FILE``, which OpenSSL reads when a context is made.
    Tornado makes its default client context once and keeps it (``_client_ssl_defaults``, an
    lru_cache), even when a TLS *server* of any earlier test accepted a connection: it is made
    again here, or a ``wss://`` client of Tornado would trust whatever that test's environment did.
    """
    tls = serving == "tls"
    if tls:
        monkeypatch.setenv("SSL_CERT_FILE", test_ca.path)
        tornado.netutil._client_ssl_defaults.cache_clear()
    server = tornado.httpserver.HTTPServer(app, ssl_options=test_ca.server if tls else None)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=request.config.option.async_test_timeout)


@pytest.fixture
def http_client(io_loop, serving, test_ca):
    """pytest-tornado's ``http_client``, trusting the test CA for the "tls" way."""
    defaults = {"ca_certs": test_ca.path} if serving == "tls" else None
    client = AsyncHTTPClient(force_instance=True, defaults=defaults)
    yield client
    client.close()


@pytest.fixture
def url(app, http_server, http_port, serving):  # app: pytest-tornado asks for it dynamically
    tls = serving == "tls"

    def make(path="/", scheme="http"):
        if tls:
            scheme = {"http": "https", "ws": "wss"}.get(scheme, scheme)
        return f"{scheme}://127.0.0.1:{http_port}{path}"

    return make


@pytest.fixture
def port(app, http_server, http_port, serving, test_ca):
    """The port of the running test server (RawClient.connect takes its TLS context from it)."""
    port = TLSPort(http_port)
    port.tls = test_ca.client if serving == "tls" else None
    return port


def start_postgres():
    """A PostgreSQL server of its own (tests/pg.py): yields it running, stops it and removes it.

    Without PostgreSQL's binaries: the test fails, asking for scripts/install-postgres, when
    root (who can install them); it skips with that reason otherwise."""
    import os

    from tests.pg import INSTALL_HINT, PostgresServer, find_binaries

    binaries = find_binaries()
    if binaries is None:
        if os.geteuid() == 0:
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    # Not under pytest's basetemp: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="wsecho-pg-"))
    server = PostgresServer(base, binaries)
    try:
        yield server.init().start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server, started on first use (about a second)."""
    yield from start_postgres()


@pytest.fixture
def own_postgres():
    """A PostgreSQL server for this test alone: one it may stop and start."""
    yield from start_postgres()


@pytest.fixture
def postgres_url(postgres_server):
    """A URL for ``--storage``: an empty schema of the test's own on the session's server."""
    return postgres_server.fresh_url()
