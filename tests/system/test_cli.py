"""The command line, as a user runs it: a real ``python -m wsecho`` process on 127.0.0.1."""

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import wsecho
from tests.helpers import ServerProcess


@pytest.fixture
def start(tmp_path):
    started = []

    def run(*args, env=None, **kwargs):
        env = {"WSECHO_DATA_DIR": str(tmp_path / f"data{len(started)}"), **(env or {})}
        server = ServerProcess(list(args), env=env, **kwargs)
        started.append(server)
        return server.ready()

    yield run
    for server in started:
        server.stop()


def run_cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "wsecho", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_help_documents_every_flag_and_its_variable():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag, var in [
        ("--host", "WSECHO_HOST"),
        ("--port", "WSECHO_PORT"),
        ("--hibernate-after", "WSECHO_HIBERNATE_AFTER"),
        ("--max-message-size", "WSECHO_MAX_MESSAGE_SIZE"),
        ("--log-level", "WSECHO_LOG_LEVEL"),
    ]:
        assert flag in result.stdout
        assert var in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        (["--hibernate-after", "0"], {}, "--hibernate-after"),
        (["--hibernate-after", "nan"], {}, "--hibernate-after"),
        (["--max-message-size", "-1"], {}, "--max-message-size"),
        (["--log-level", "loud"], {}, "--log-level"),
        ([], {"WSECHO_PORT": "x"}, "WSECHO_PORT (for --port)"),
        ([], {"WSECHO_HIBERNATE_AFTER": "-3"}, "WSECHO_HIBERNATE_AFTER (for --hibernate-after)"),
        (["--storage", "mysql://u:pw@db/x"], {}, "--storage: must be sqlite or a postgresql:// (or postgres://) URL"),
        ([], {"WSECHO_STORAGE": "postgresql"}, "WSECHO_STORAGE (for --storage): must be sqlite or a postgresql://"),
        (["no_such_module_here"], {}, "cannot load 'no_such_module_here'"),
        (["json:nothing"], {}, "json.nothing must be a wsecho.App"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(args, env, named):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert named in result.stderr
    # One line, not twenty lines of usage before the one that matters.
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_an_unknown_flag_is_one_line_pointing_at_help():
    result = run_cli("--hibernate-afer=3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "wsecho: error: unrecognized arguments: --hibernate-afer=3 (wsecho --help lists the options)"
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from wsecho import App\n\ndef fetch(request, env)\n", "{}broken.py, line 3: expected ':'"),
        ("import no_such_dependency_here\n", "No module named 'no_such_dependency_here' ({}broken.py, line 1)"),
        (
            "x = 1\nraise RuntimeError('no config')\n",
            "importing it raised RuntimeError: no config ({}broken.py, line 2)",
        ),
    ],
    ids=["syntax error", "import error", "raises on import"],
)
def test_an_app_module_that_does_not_import_is_one_line_exit_2(tmp_path, source, expected):
    (tmp_path / "broken.py").write_text(source)
    result = run_cli("broken", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"wsecho: error: cannot load 'broken': {expected.format(f'{tmp_path}/')}"]


def test_the_same_port_for_both_listeners_is_refused_before_binding():
    result = run_cli("--port", "8788", "--admin-port", "8788", env={"WSECHO_DATA_DIR": ":memory:"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "wsecho: error: --admin-port: must differ from --port 8788: the application and the admin "
        "listener cannot share 127.0.0.1 port 8788"
    ]


@pytest.mark.parametrize(
    ("flags", "listener"),
    [
        (["--port", "{port}"], "the application listener cannot listen on 127.0.0.1 port {port} (--host, --port)"),
        (
            ["--port", "0", "--admin-port", "{port}"],
            "the admin listener cannot listen on 127.0.0.1 port {port} (--admin-host, --admin-port)",
        ),
    ],
    ids=["application", "admin"],
)
def test_a_port_in_use_names_the_listener_the_address_and_the_port(flags, listener):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(*(f.format(port=port) for f in flags), env={"WSECHO_DATA_DIR": ":memory:"})
    assert result.returncode == 1  # a run-time failure, not bad configuration
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].endswith(f"cannot start: {listener.format(port=port)}: address already in use")


def test_version_prints_the_package_version():
    for command in ([sys.executable, "-m", "wsecho"], [str(Path(sys.executable).parent / "wsecho")]):
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
        assert (result.returncode, result.stdout) == (0, f"wsecho {wsecho.__version__}\n")


def test_a_flag_wins_over_its_variable(start):
    server = start("--port", "0", env={"WSECHO_PORT": "1"})
    assert server.port != 1


def test_default_app_answers_and_hibernates_while_sockets_stay_open(start):
    server = start("--port", "0", "--hibernate-after", "0.3")
    status, body, headers = server.get("/getCurrentConnections")
    assert (status, body) == (200, "There are 0 WebSocket clients connected to this Durable Object instance.")
    assert headers["Content-Type"] == "text/plain;charset=UTF-8"
    with connect(server.url("/websocket", "ws"), open_timeout=5) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "[Durable Object]: before"
        server.wait_for(r"hibernated 1 idle object \(")
        ws.send("after")
        assert ws.recv(timeout=5) == "[Durable Object]: after"
        assert server.get("/getCurrentConnections")[1] == (
            "There is 1 WebSocket client connected to this Durable Object instance."
        )


def test_sigterm_closes_sockets_with_1001_and_exits_0(start):
    server = start("--port", "0")
    with connect(server.url("/websocket", "ws"), open_timeout=5) as ws:
        ws.send("hi")
        ws.recv(timeout=5)
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1001
        assert ws.close_reason == "Going Away"
    assert server.proc.wait(timeout=10) == 0


def test_module_colon_app_and_module_alone_load_like_uvicorn(start, tmp_path: Path):
    (tmp_path / "myapp.py").write_text(
        textwrap.dedent(
            """
            from wsecho import App, Response

            def fetch(request, env):
                return Response("hello from myapp")

            app = App(fetch=fetch)
            other = App(fetch=lambda request, env: Response("other"))
            """
        )
    )
    assert start("myapp", "--port", "0", cwd=tmp_path).get("/")[1] == "hello from myapp"
    assert start("myapp:other", "--port", "0", cwd=tmp_path).get("/")[1] == "other"


def test_settings_come_from_the_environment(start):
    server = start(env={"WSECHO_PORT": "0", "WSECHO_HIBERNATE_AFTER": "7.5", "WSECHO_LOG_LEVEL": "debug"})
    assert "hibernate after 7.5s" in server.seen[-1]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "wsecho"
    assert script.exists(), "pip install should create the wsecho console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "--hibernate-after" in result.stdout


def test_the_mit_license_ships_with_the_package():
    # setup.cfg said MIT, but there was no LICENSE file to ship (the MIT licence asks for it).
    dist = importlib.metadata.distribution("wsecho")
    assert dist.metadata["License"] == "MIT"
    assert dist.metadata.get_all("License-File") == ["LICENSE"]
    licence = dist.locate_file(next(f for f in dist.files if f.name == "LICENSE")).read_text(encoding="utf-8")
    assert licence.startswith("MIT License\n\nCopyright (c) the wsecho authors\n")
