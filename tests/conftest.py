import asyncio
from datetime import UTC, datetime

import pytest
import tornado.web
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
    # (where the module lists it in SERVINGS) the objects mounted in a Tornado application.
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
    if serving == "tornado":
        mount = Mount(runtime.app, runtime=runtime, sweeper=False)
        return tornado.web.Application(mount.routes(), websocket_max_message_size=MAX_MESSAGE)
    return make_application(runtime, max_message_size=MAX_MESSAGE)


@pytest.fixture
def url(app, http_server, http_port):  # app: pytest-tornado asks for it dynamically; named here for SERVINGS
    def make(path="/", scheme="http"):
        return f"{scheme}://127.0.0.1:{http_port}{path}"

    return make


@pytest.fixture
def port(app, http_server, http_port):
    """The port of the running test server."""
    return http_port
