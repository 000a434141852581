"""Operating the server: configuration, admin endpoints, metrics, logging, signals, systemd notify."""

import asyncio
import json
import logging
import re
import signal
import socket
import urllib.error
import urllib.request

import attrs
import pytest
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect

from tests.apps.lab import lab_app
from tests.helpers import RawClient, Recorder, ServerProcess, probe_app, until
from wsecho.core.errors import ConfigError
from wsecho.core.limits import Limits
from wsecho.serve.config import OPTIONS, Settings, build_parser, settings_from
from wsecho.serve.server import Server

# -- configuration ------------------------------------------------------------------------------


def resolve(argv, environ, tmp_path=None, toml=None):
    if toml is not None:
        path = tmp_path / "wsecho.toml"
        path.write_text(toml)
        argv = [*argv, "--config", str(path)]
    return settings_from(build_parser().parse_args(argv), environ)


def test_precedence_is_flag_then_variable_then_file_then_default(tmp_path):
    toml = 'port = 1000\nhibernate_after = 3\nlog_level = "warning"\naccess_log = false\napp = "x:y"\n'
    s = resolve(["--port", "3000"], {"WSECHO_PORT": "2000", "WSECHO_HIBERNATE_AFTER": "4"}, tmp_path, toml)
    assert s.port == 3000  # flag
    assert s.hibernate_after == 4.0  # variable over file
    assert s.log_level == "warning"  # file over default
    assert s.access_log is False
    assert s.app == "x:y"
    assert s.max_message_size == 1024 * 1024  # default
    assert resolve([], {"WSECHO_CONFIG": str(tmp_path / "wsecho.toml")}).port == 1000


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("hibernate_afer = 3\n", "unknown key 'hibernate_afer'"),
        ("hibernate-after = 3\n", "unknown key 'hibernate-after' (did you mean hibernate_after?)"),
        ("port = 70000\n", "wsecho.toml: port: must be from 0 to 65535"),
        ("admin_port = [1]\n", "admin_port: must be a string, number or boolean"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path, toml, message):
    with pytest.raises(ConfigError) as info:
        resolve([], {}, tmp_path, toml)
    assert message in str(info.value)


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        resolve(["--config", str(tmp_path / "nope.toml")], {})


def test_admin_port_is_off_by_default_and_systemd_state_directory_is_the_default_data_dir():
    s = resolve([], {"STATE_DIRECTORY": "/var/lib/wsecho:/var/lib/other"})
    assert s.admin_port is None
    assert s.data_dir == "/var/lib/wsecho"
    assert resolve(["--data-dir", "here"], {"STATE_DIRECTORY": "/var/lib/wsecho"}).data_dir == "here"


# Each SPEC §4 limit (and the fan-out queue limit): its flag, a lowered value, and the Limits field it sets.
LIMIT_FLAGS = [
    ("--max-sockets-per-object", "1", "sockets_per_object", 1),
    ("--max-tags-per-socket", "2", "tags_per_socket", 2),
    ("--max-tag-bytes", "4", "tag_bytes", 4),
    ("--max-attachment-bytes", "1KiB", "attachment_bytes", 1024),
    ("--max-auto-response-bytes", "8", "auto_response_bytes", 8),
    ("--max-auto-responses", "2", "auto_responses", 2),
    ("--max-event-timeout", "1000", "event_timeout_ms", 1000),
    ("--max-object-storage", "1MiB", "object_storage_bytes", 1024**2),
    ("--max-storage", "off", "storage_bytes", None),
    ("--max-fanout-queue", "256KiB", "fanout_queue_bytes", 256 * 1024),
    ("--max-outbound-per-object", "2", "outbound_per_object", 2),
    ("--max-outbound", "100", "outbound_sockets", 100),
]


def test_settings_take_every_default_from_the_options():
    option_defaults = {opt.dest: opt.parse(opt.default) for opt in OPTIONS}
    fields = {f.name: f.default for f in attrs.fields(Settings) if f.name not in ("app", "config")}
    assert fields == option_defaults


def test_every_limit_is_an_option_with_cloudflares_default():
    assert {opt.limit for opt in OPTIONS if opt.limit} == set(attrs.fields_dict(Limits))
    assert {field for _, _, field, _ in LIMIT_FLAGS} == set(attrs.fields_dict(Limits))
    assert resolve([], {}).limits == Limits()


@pytest.mark.parametrize(("flag", "text", "field", "value"), LIMIT_FLAGS)
def test_every_limit_comes_from_its_flag_variable_and_file_key(tmp_path, flag, text, field, value):
    dest = flag[2:].replace("-", "_")
    from_flag = resolve([flag, text], {})
    from_variable = resolve([], {f"WSECHO_{dest.upper()}": text})
    from_file = resolve([], {}, tmp_path, f"{dest} = {json.dumps(text)}\n")
    for settings in (from_flag, from_variable, from_file):
        assert getattr(settings.limits, field) == value
        assert settings.limits == attrs.evolve(Limits(), **{field: value})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-sockets-per-object", "0"], "--max-sockets-per-object: must be 1 or more, got 0"),
        (["--max-tags-per-socket", "-1"], "--max-tags-per-socket: must be 1 or more, got -1"),
        (["--max-tag-bytes", "0"], "--max-tag-bytes: must be a number of bytes of 1 or more"),
        (["--max-attachment-bytes", "off"], "--max-attachment-bytes: must be a number of bytes of 1 or more"),
        (["--max-auto-response-bytes", "2k"], "--max-auto-response-bytes: must be a number of bytes of 1 or more"),
        (["--max-event-timeout", "7d"], "--max-event-timeout: must be a whole number, got '7d'"),
        (
            ["--max-fanout-queue", "1000"],
            "--max-fanout-queue: must be at least 65536 bytes (64KiB, the send queue's high-water mark), got 1000",
        ),
    ],
)
def test_bad_limits_name_the_flag_and_the_bound(argv, message):
    with pytest.raises(ConfigError) as info:
        resolve(argv, {})
    assert message in str(info.value)


def test_a_bad_limit_in_a_variable_or_the_file_names_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"WSECHO_MAX_TAGS_PER_SOCKET \(for --max-tags-per-socket\): must be 1"):
        resolve([], {"WSECHO_MAX_TAGS_PER_SOCKET": "0"})
    with pytest.raises(ConfigError, match=r"wsecho\.toml: max_tag_bytes: must be a number of bytes of 1 or more"):
        resolve([], {}, tmp_path, "max_tag_bytes = 0\n")


@pytest.fixture
def limited_server(io_loop, tmp_path):
    """A Server (lab application) whose limits come from the command line, all lowered."""
    argv = [arg for flag, text, _, _ in LIMIT_FLAGS for arg in (flag, text)]
    settings = attrs.evolve(resolve(argv, {}), port=0, data_dir=":memory:")
    server = Server(lab_app(Recorder(), {}), settings)
    io_loop.run_sync(server.start)
    yield server
    io_loop.run_sync(server.stop)


async def lab(ws, op, **args):
    await ws.send(json.dumps({"op": op, **args}))
    return json.loads(await ws.recv())


@pytest.mark.gen_test
async def test_limits_from_the_command_line_reach_the_objects(limited_server, caplog):
    base = f"127.0.0.1:{limited_server.port}/lab"
    client = AsyncHTTPClient()

    async def refused(path):
        response = await client.fetch(f"http://{base}{path}", raise_error=False)
        return response.code == 500

    assert await refused("/many/ws?tags=a,b,c")
    assert await refused("/long/ws?tags=abcde")
    messages = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("3 distinct tags; the limit is 2" in m for m in messages)
    assert any("is 5 UTF-8 bytes; the limit is 4" in m for m in messages)
    async with connect(f"ws://{base}/one/ws?tags=a,b") as ws:
        assert await refused("/one/ws")  # the second socket of that object
        assert any("the limit is 1" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
        answer = await lab(ws, "set_huge", size=1023)
        assert answer["error"].endswith("the value is 1025 bytes encoded; the limit is 1024")
        answer = await lab(ws, "set_auto", request="123456789", response="ok")
        assert answer["error"].endswith("the request is 9 UTF-8 bytes; the limit is 8")
        answer = await lab(ws, "timeout", ms=1001)
        assert "ms must be an integer from 1 to 1000" in answer["error"]
        assert await lab(ws, "timeout", ms=1000) == {"ok": None}


# -- admin endpoints and metrics (in process) ------------------------------------------------------


def metric(text, name, labels=""):
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+]+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{{{labels}}} not in the metrics"
    return float(match.group(1))


@pytest.fixture
def admin_server(io_loop, tmp_path):
    from wsecho.serve.config import Settings

    recorder = Recorder()
    server = Server(probe_app(recorder), Settings(port=0, admin_port=0, data_dir=str(tmp_path / "d")))
    io_loop.run_sync(server.start)
    yield server, recorder
    if server.phase != "stopped":
        io_loop.run_sync(server.stop)


async def get(server, path):
    client = AsyncHTTPClient()
    return await client.fetch(f"http://127.0.0.1:{server.admin_port}{path}", raise_error=False)


@pytest.mark.gen_test
async def test_metrics_after_a_known_sequence(admin_server, io_loop):
    server, recorder = admin_server
    base = f"ws://127.0.0.1:{server.port}/obj/m/ws"
    async with connect(base) as a:
        b = await RawClient.connect(server.port, "/obj/m/ws")
        for i in range(3):
            await a.send(f"m{i}")
            assert await a.recv() == f"echo:m{i}"
        b.abort()
        await recorder.wait_for(lambda r: any(e[0] == "close" and e[1] == 1006 for e in r.events))
        assert server.runtime.sweep(now=io_loop.time() + 60) == 1
        await a.send("wake")
        assert await a.recv() == "echo:wake"
        await a.close(4000)
    await recorder.wait_for(lambda r: len(r.of("close")) == 2)
    text = (await get(server, "/metrics")).body.decode()
    assert metric(text, "wsecho_sockets_accepted_total") == 2
    assert metric(text, "wsecho_messages_received_total") == 4
    assert metric(text, "wsecho_messages_sent_total") == 4
    assert metric(text, "wsecho_sockets_closed_total", 'code="1006",name="abnormal_closure"') == 1
    assert metric(text, "wsecho_sockets_closed_total", 'code="4000-4999",name="private_use"') == 1
    assert metric(text, "wsecho_sockets_open") == 0
    assert metric(text, "wsecho_wakes_total") == 1
    assert metric(text, "wsecho_evictions_total", 'reason="idle"') == 1
    assert metric(text, "wsecho_wake_latency_seconds_count") == 2  # the first creation and the wake
    assert metric(text, "wsecho_objects", 'state="active"') == 1
    assert "wsecho_event_loop_lag_seconds" in text
    assert metric(text, "wsecho_storage_bytes") == server.runtime.committer.stored_bytes
    assert metric(text, "wsecho_storage_quota_refusals_total", 'quota="object"') == 0
    assert metric(text, "wsecho_dead_peers_total") == 0


@pytest.mark.gen_test
async def test_handler_errors_are_counted_by_handler(admin_server):
    server, _ = admin_server
    async with connect(f"ws://127.0.0.1:{server.port}/obj/e/ws") as ws:
        await ws.send("raise")
        await ws.send("ok")
        await ws.recv()
    text = (await get(server, "/metrics")).body.decode()
    assert metric(text, "wsecho_handler_errors_total", 'handler="web_socket_message"') == 1


@pytest.mark.gen_test
async def test_objects_lists_state_sockets_and_what_pins_them(admin_server, io_loop):
    server, _ = admin_server
    gate = asyncio.get_running_loop().create_future()
    server.runtime.app.vars["FLAGS"]["gate"] = gate
    async with connect(f"ws://127.0.0.1:{server.port}/obj/listed/ws"):
        busy = asyncio.ensure_future(server.runtime.env.PROBE.get_by_name("listed").fetch("http://x/obj/listed/wait"))
        await until(lambda: server.runtime.find("PROBE", "listed").lifecycle.current is not None)
        data = json.loads((await get(server, "/objects")).body)
        (obj,) = data["objects"]
        assert obj["name"] == "listed"
        assert obj["class"] == "Probe"
        assert obj["state"] == "active"
        assert obj["sockets"] == 1
        assert obj["cannot_hibernate_because"] == "its fetch turn is running"
        assert obj["evictable"] is False
        gate.set_result(None)
        await busy
        assert server.runtime.sweep(now=io_loop.time() + 60) == 1
        data = json.loads((await get(server, "/objects?state=hibernating")).body)
        assert [o["state"] for o in data["objects"]] == ["hibernating"]
        assert data["objects"][0]["cannot_hibernate_because"] is None
        assert (await get(server, "/objects?limit=x")).code == 400


@pytest.mark.gen_test
async def test_health_and_readiness_through_a_drain(admin_server):
    server, _ = admin_server
    assert (await get(server, "/healthz")).body == b"ok\n"
    ready = await get(server, "/readyz")
    assert (ready.code, ready.body) == (200, b"ready\n")
    # A peer that never answers the 1001 Close keeps the drain going.
    raw = await RawClient.connect(server.port, "/obj/d/ws")
    stopping = asyncio.ensure_future(server.stop(timeout=5))
    assert await raw.read_close() == (1001, "Going Away")
    draining = await get(server, "/readyz")
    assert (draining.code, draining.body) == (503, b"draining\n")
    assert (await get(server, "/healthz")).code == 200
    raw.send_close(1001)
    await asyncio.wait_for(stopping, 5)
    raw.abort()
    assert server.phase == "stopped"


@pytest.mark.gen_test
async def test_a_readyz_503_while_draining_is_logged_at_info_not_error(admin_server, caplog):
    # Every load balancer probe during a deploy gets this 503: an ERROR line for each is noise.
    server, _ = admin_server
    caplog.set_level(logging.INFO, logger="tornado.access")
    raw = await RawClient.connect(server.port, "/obj/d/ws")  # holds the drain open
    stopping = asyncio.ensure_future(server.stop(timeout=5))
    assert await raw.read_close() == (1001, "Going Away")
    assert (await get(server, "/readyz")).code == 503
    assert (await get(server, "/no-such-path")).code == 404
    raw.send_close(1001)
    await asyncio.wait_for(stopping, 5)
    raw.abort()
    logged = {r.getMessage().split(" (")[0]: r.levelname for r in caplog.records if r.name == "tornado.access"}
    assert logged["503 GET /readyz"] == "INFO"
    assert logged["404 GET /no-such-path"] == "WARNING"  # the other answers keep Tornado's levels


# -- the real process: signals, notify, logging ---------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def next_notification(sock, wanted):
    """Read datagrams until one has an assignment starting with ``wanted``; bounded by the timeout."""
    while True:
        lines = sock.recv(4096).decode().split("\n")
        for line in lines:
            if line.startswith(wanted):
                return line


@pytest.fixture
def processes():
    started = []
    yield started
    for server in started:
        server.stop()


def run_server(processes, tmp_path, *args, env=None):
    data = tmp_path / f"data{len(processes)}"
    server = ServerProcess([*args, "--port", "0", "--data-dir", str(data)], env=env)
    processes.append(server)
    return server.ready()


def test_systemd_notify_ready_status_watchdog_and_stopping(processes, tmp_path, notify_socket):
    sock, path = notify_socket
    server = run_server(processes, tmp_path, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    assert next_notification(sock, "READY=") == "READY=1"
    assert next_notification(sock, "STATUS=").startswith("STATUS=ready: 0 WebSockets")
    assert next_notification(sock, "WATCHDOG=") == "WATCHDOG=1"
    server.proc.send_signal(signal.SIGTERM)
    assert next_notification(sock, "STOPPING=") == "STOPPING=1"
    assert server.proc.wait(timeout=10) == 0


def test_sigterm_drains_open_sockets_with_1001_and_exits_0(processes, tmp_path):
    server = run_server(processes, tmp_path, "--admin-port", "0")
    admin = int(server.wait_for(r"admin listener on http://127\.0\.0\.1:(\d+)").group(1))

    async def scenario():
        async with connect(server.url("/websocket", "ws")) as ws:
            raw = await RawClient.connect(server.port)  # never answers the Close
            await ws.send("hi")
            await ws.recv()
            server.proc.send_signal(signal.SIGTERM)
            assert await raw.read_close() == (1001, "Going Away")
            # while the raw peer holds the drain open, the server says it is not ready
            with pytest.raises(urllib.error.HTTPError) as info:
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{admin}/readyz", timeout=5)
            assert info.value.code == 503
            info.value.close()
            await ws.wait_closed()
            assert (ws.close_code, ws.close_reason) == (1001, "Going Away")
            raw.send_close(1001)
            await raw.wait_closed()

    run_in_new_loop(scenario)
    assert server.proc.wait(timeout=10) == 0


def test_a_second_signal_exits_at_once(processes, tmp_path):
    server = run_server(processes, tmp_path, "--drain-timeout", "60")

    async def scenario():
        raw = await RawClient.connect(server.port)
        server.proc.send_signal(signal.SIGTERM)
        assert await raw.read_close() == (1001, "Going Away")
        server.proc.send_signal(signal.SIGINT)
        await raw.wait_closed()

    run_in_new_loop(scenario)
    assert server.proc.wait(timeout=10) == 1
    server.wait_for(r"second SIGINT: exiting at once")


def test_sighup_rereads_the_config_and_reopens_the_log_file(processes, tmp_path):
    config = tmp_path / "wsecho.toml"
    config.write_text("hibernate_after = 7\n")
    log_file = tmp_path / "wsecho.log"
    server = ServerProcess(
        ["--port", "0", "--data-dir", str(tmp_path / "d"), "--config", str(config), "--log-file", str(log_file)]
    )
    processes.append(server)
    # logs go to the file: wait for its start-up line there
    asyncio_free_wait(lambda: "wsecho serving" in read(log_file))
    config.write_text('hibernate_after = 2\nmax_message_size = 5000\nlog_format = "json"\n')
    log_file.rename(tmp_path / "wsecho.log.1")
    server.proc.send_signal(signal.SIGHUP)
    asyncio_free_wait(lambda: "settings re-read" in read(log_file))
    lines = [json.loads(line) for line in read(log_file).splitlines()]
    assert any("hibernate after 2s" in line["message"] for line in lines)
    assert any("max_message_size changed but only take effect after a restart" in line["message"] for line in lines)
    config.write_text("hibernate_after = -1\n")
    server.proc.send_signal(signal.SIGHUP)
    asyncio_free_wait(lambda: "keeping the current settings" in read(log_file))
    assert server.proc.poll() is None


def test_json_logs_and_access_log_off(processes, tmp_path):
    server = run_server(processes, tmp_path, "--log-format", "json", "--access-log", "off")
    assert server.get("/")[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=10) == 0
    server.wait_for(r'"message": "stopped"')
    records = [json.loads(line) for line in server.seen]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert not any(r["logger"] == "tornado.access" for r in records)


def test_access_log_is_on_by_default(processes, tmp_path):
    server = run_server(processes, tmp_path)
    server.get("/getCurrentConnections")
    server.wait_for(r"tornado\.access: 200 GET /getCurrentConnections")


# -- small helpers ---------------------------------------------------------------------------------


def read(path):
    return path.read_text() if path.exists() else ""


def asyncio_free_wait(predicate, timeout=10.0):
    """Poll a file-system predicate (bounded); no event exists for "a log line was written"."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for a log line")
        time.sleep(0.02)


def run_in_new_loop(coro_fn):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), 20))
    finally:
        loop.close()


def test_storage_quotas_take_bytes_with_binary_units_or_off():
    s = resolve(["--max-object-storage", "64MiB", "--max-storage", "off"], {})
    assert (s.max_object_storage, s.max_storage) == (64 * 1024**2, None)
    assert resolve([], {"WSECHO_MAX_STORAGE": "1048576"}).max_storage == 1048576
    defaults = resolve([], {})
    assert (defaults.max_object_storage, defaults.max_storage) == (128 * 1024**2, 4 * 1024**3)
    for bad in ("-1", "1.5GiB", "lots", "0MiB", "²"):
        with pytest.raises(ConfigError, match="must be a number of bytes"):
            resolve(["--max-object-storage", bad], {})
    server = Server(probe_app(Recorder()), settings_from(build_parser().parse_args(["--max-storage", "2KiB"]), {}))
    assert server.runtime.limits.storage_bytes == 2048


def test_every_count_is_exported_with_a_help_line(admin_server, io_loop):
    # Issue 12: 8 of the 16 counts never reached /metrics. Every plain count of Stats has a
    # metric, and every metric family says what it counts.
    import attrs

    from wsecho.core.stats import StatsSnapshot
    from wsecho.serve.metrics import COUNTERS

    server, _ = admin_server
    plain = {f.name for f in attrs.fields(StatsSnapshot) if f.type in ("int", int)}
    assert plain == set(COUNTERS)
    text = io_loop.run_sync(lambda: get(server, "/metrics")).body.decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.M))
    assert {f"{name}_total" for name, _ in COUNTERS.values()} <= families
    assert families == set(helps)
    assert all(len(h) > 10 for h in helps.values())
