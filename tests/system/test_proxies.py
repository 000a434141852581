"""wsecho behind a real nginx and a real HAProxy, configured with docs/deploying.md's snippets.

Each test writes the page's ``proxy config`` block for the proxy into a temporary directory,
with the placeholders (the certificate, the public port, wsecho's port) replaced by this
test's, starts Debian's ``nginx`` or ``haproxy`` on 127.0.0.1 as a subprocess, and talks
``wss://`` through it to an in-process wsecho started with the page's command line. A
replacement that no longer matches the page fails the test, so the page cannot drift. The
client connects from 127.0.0.2 and sends a forged ``X-Forwarded-For``; the application
(tests/apps/whoami.py) says what address and URL it saw. Without the binaries (not root, so
``scripts/install-proxies`` could not install them) the proxy tests skip, saying so.
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import attrs
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from wsecho.core.errors import ConfigError
from wsecho.core.forwarded import TrustedProxies
from wsecho.core.lifecycle import ObjectState
from wsecho.serve.appcode import load_app
from wsecho.serve.config import build_parser, parse, settings_from
from wsecho.serve.server import Server

ROOT = Path(__file__).resolve().parents[2]
DEPLOYING = ROOT / "docs" / "deploying.md"
MARKED = re.compile(r"<!-- proxy config: (\S+) -->\n```\w*\n(.*?)```", re.S)
#: The public name the snippets serve; the client asks for it and the certificate is for it.
PUBLIC = "chat.example.com"
#: The client's own address: another loopback address than the proxy's 127.0.0.1, so that
#: the application can tell them apart.
CLIENT = "127.0.0.2"
FORGED = "203.0.113.9"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def resolve(argv, environ):
    return settings_from(build_parser().parse_args(argv), environ)


def snippet(name):
    found = {m.group(1): m.group(2) for m in MARKED.finditer(DEPLOYING.read_text(encoding="utf-8"))}
    assert name in found, f"docs/deploying.md has no block marked <!-- proxy config: {name} -->"
    return found[name]


def substitute(name, text, replacements):
    """``text`` with each placeholder replaced; one that is not there once fails the test."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"docs/deploying.md's {name} snippet no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def binary(name):
    path = shutil.which(name, path=SBIN)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/install-proxies installs Debian's {name} as root)")
    return path


def free_port():
    # The proxies cannot report the port they bound, so the test picks one (a tiny race).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for PUBLIC: (certificate, key, combined PEM, client context)."""
    openssl = binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={PUBLIC}"),
            *("-addext", f"subjectAltName=DNS:{PUBLIC}"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    combined = tmp_path / "combined.pem"
    combined.write_text(cert.read_text() + key.read_text())
    context = ssl.create_default_context(cafile=str(cert))
    return cert, key, combined, context


def nginx_config(executable, tmp_path, certificate, public_port, wsecho_port):
    cert, key, _, _ = certificate
    site = substitute(
        "nginx",
        snippet("nginx"),
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{public_port} ssl;",
            "server 127.0.0.1:8787;": f"server 127.0.0.1:{wsecho_port};",
            f"/etc/letsencrypt/live/{PUBLIC}/fullchain.pem": str(cert),
            f"/etc/letsencrypt/live/{PUBLIC}/privkey.pem": str(key),
        },
    )
    # What Debian's /etc/nginx/nginx.conf would be around conf.d, with every path in tmp_path.
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'} info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n    access_log {tmp_path / 'access.log'};\n{temp}\n{site}\n}}\n"
    )
    return [executable, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(config)]


def haproxy_config(executable, tmp_path, certificate, public_port, wsecho_port):
    _, _, combined, _ = certificate
    body = substitute(
        "haproxy",
        snippet("haproxy"),
        {
            f"bind :443 ssl crt /etc/haproxy/certs/{PUBLIC}.pem": f"bind 127.0.0.1:{public_port} ssl crt {combined}",
            "server wsecho1 127.0.0.1:8787": f"server wsecho1 127.0.0.1:{wsecho_port}",
        },
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"global\n    maxconn 64\n\n{body}")
    return [executable, "-db", "-f", str(config)]


PROXIES = {"nginx": nginx_config, "haproxy": haproxy_config}


@pytest.fixture
def executable(name):
    """The proxy's binary, found before the test's coroutine starts (a skip cannot cross it)."""
    return binary(name)


@contextlib.asynccontextmanager
async def proxy(name, executable, tmp_path, certificate, wsecho_port):
    """``name`` in front of wsecho, on a free port (yielded); stopped by its PID afterwards."""
    public_port = free_port()
    command = PROXIES[name](executable, tmp_path, certificate, public_port, wsecho_port)
    output = tmp_path / f"{name}.out"
    with output.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:

        async def listening():
            assert process.poll() is None, f"{name} exited: {output.read_text()}"
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", public_port)
                writer.close()
                return True
            return False

        await until_true(listening)
        yield public_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def until_true(check, timeout=10.0):
    async def poll():
        while not await check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def wsecho(*, trusted):
    """The app behind the page's wsecho command line (without --forwarded-allow-ips if not ``trusted``)."""
    argv = shlex.split(snippet("wsecho"))
    assert argv[0] == "wsecho"
    argv = substitute("wsecho", " ".join(argv[1:]), {"--port 8787": "--port 0"}).split()
    if not trusted:
        at = argv.index("--forwarded-allow-ips")
        del argv[at : at + 2]
    settings, _ = parse(argv, {})
    server = Server(load_app("tests.apps.whoami"), attrs.evolve(settings, data_dir=":memory:"), sweeper=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def dial(port, context):
    """A WebSocket to PUBLIC through the proxy on ``port``, from CLIENT, with a forged X-Forwarded-For,
    and the Origin of a page served by the same proxy (as a browser sends it)."""
    return connect(
        f"wss://{PUBLIC}:{port}/websocket",
        origin=f"https://{PUBLIC}:{port}",
        host="127.0.0.1",
        port=port,
        ssl=context,
        local_addr=(CLIENT, 0),
        proxy=None,
        additional_headers={"X-Forwarded-For": FORGED},
        open_timeout=10,
        close_timeout=10,
    )


@contextlib.asynccontextmanager
async def through(name, executable, tmp_path, certificate, *, trusted):
    """wsecho behind the proxy ``name``, and a WebSocket to it through the proxy: (server, ws)."""
    async with (
        wsecho(trusted=trusted) as server,
        proxy(name, executable, tmp_path, certificate, server.port) as port,
        dial(port, certificate[3]) as ws,
    ):
        yield server, ws


async def ask(ws, text):
    await ws.send(text)
    return await asyncio.wait_for(ws.recv(), 10)


@pytest.mark.parametrize("name", sorted(PROXIES))
@pytest.mark.gen_test(timeout=60)
async def test_a_websocket_through_the_proxy_echoes_hibernates_and_closes_with_its_code(
    name, executable, tmp_path, certificate, io_loop, caplog
):
    caplog.set_level(logging.INFO, logger="tornado.access")
    async with through(name, executable, tmp_path, certificate, trusted=True) as (server, ws):
        seen = json.loads(await ask(ws, "whoami"))
        # The proxy is trusted: the client's own address (not the forged one, not the proxy's),
        # and the scheme the client used with the proxy.
        assert seen["address"] == CLIENT
        # The proxy passed the Host on: the public URL, which the same-origin check compared the
        # Origin with (--allowed-hosts names the public host).
        assert seen["url"] == f"https://{PUBLIC}:{ws.remote_address[1]}/websocket"
        assert await ask(ws, "hello") == "hello"
        host = server.runtime.find("WHO", "who")
        assert server.runtime.sweep(now=io_loop.time() + 3600) == 1
        assert host.lifecycle.state is ObjectState.HIBERNATING
        # The socket stayed open through the proxy; a message wakes the object.
        assert json.loads(await ask(ws, "whoami")) == seen
        assert host.lifecycle.state is ObjectState.ACTIVE
        await ws.send("close 4123")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 4123
        assert ws.close_reason == "bye"
    assert any(f"/websocket ({CLIENT})" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("name", sorted(PROXIES))
@pytest.mark.gen_test(timeout=60)
async def test_without_forwarded_allow_ips_the_application_sees_the_proxy(
    name, executable, tmp_path, certificate, caplog
):
    caplog.set_level(logging.INFO, logger="tornado.access")
    async with through(name, executable, tmp_path, certificate, trusted=False) as (_, ws):
        seen = json.loads(await ask(ws, "whoami"))
    assert seen["address"] == "127.0.0.1"  # the proxy's; X-Forwarded-For is ignored
    assert seen["url"].startswith(f"http://{PUBLIC}")  # the connection's; X-Forwarded-Proto too
    assert any("/websocket (127.0.0.1)" in record.getMessage() for record in caplog.records)


# -- the same rules without a proxy: a client that claims to be one ----------------------------


@pytest.mark.parametrize(
    ("allow", "headers", "address", "scheme"),
    [
        ("", {"X-Forwarded-For": FORGED, "X-Forwarded-Proto": "https"}, "127.0.0.1", "http"),
        ("10.0.0.0/8", {"X-Forwarded-For": FORGED}, "127.0.0.1", "http"),
        ("127.0.0.1", {"X-Forwarded-For": FORGED, "X-Forwarded-Proto": "https"}, FORGED, "https"),
        ("127.0.0.0/8", {"X-Forwarded-For": f"198.51.100.1, {FORGED}, 127.0.0.5"}, FORGED, "http"),
        ("*", {"X-Forwarded-For": f"198.51.100.1, {FORGED}"}, "198.51.100.1", "http"),
        ("127.0.0.1", {"X-Forwarded-Proto": "gopher"}, "127.0.0.1", "http"),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_forwarded_headers_count_only_from_a_trusted_peer(allow, headers, address, scheme, caplog):
    caplog.set_level(logging.INFO, logger="tornado.access")
    settings, _ = parse(["--port", "0", "--data-dir", ":memory:", "--forwarded-allow-ips", allow], {})
    server = Server(load_app("tests.apps.whoami"), settings, sweeper=False)
    await server.start()
    try:
        # A client that sends its own CF-Connecting-IP never gets it through either.
        forged = {**headers, "CF-Connecting-IP": "192.0.2.1"}
        lines = "".join(f"{k}: {v}\r\n" for k, v in forged.items())
        request = f"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}Connection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request.encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await server.stop()
    seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert seen == {"address": address, "url": f"{scheme}://127.0.0.1/whoami"}
    assert any(f"/whoami ({address})" in record.getMessage() for record in caplog.records)


def test_the_option_comes_from_flag_variable_and_file_and_a_bad_entry_is_named(tmp_path):
    config = tmp_path / "wsecho.toml"
    config.write_text('forwarded_allow_ips = "10.0.0.0/8"\n')
    assert resolve([], {}).forwarded_allow_ips == TrustedProxies()  # none trusted by default
    assert resolve(["--config", str(config)], {}).forwarded_allow_ips == TrustedProxies.parse("10.0.0.0/8")
    from_variable = resolve(["--config", str(config)], {"WSECHO_FORWARDED_ALLOW_IPS": "127.0.0.1, ::1"})
    assert from_variable.forwarded_allow_ips == TrustedProxies.parse("127.0.0.1,::1")
    with pytest.raises(ConfigError) as info:
        resolve(["--forwarded-allow-ips", "127.0.0.1,localhost"], {})
    assert str(info.value).startswith("--forwarded-allow-ips: ")
    assert "got 'localhost'" in str(info.value)
