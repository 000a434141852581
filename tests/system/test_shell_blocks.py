"""Every shell block of the README and docs, run as a user runs it (or listed with the reason).

The blocks run in a fresh copy of the checkout (its tracked files only), one after the other
as a new user would: set-up command 1 installs and serves, then the echo table's commands
talk to that server. Fixed ports are the only change (tests bind ephemeral ports): the
server gets ``WSECHO_PORT=0`` and the commands the port it logged.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHELL = re.compile(r"^```(?:sh|bash|shell|console)\n(.*?)^```", re.S | re.M)

#: How long a block may take to install and serve (pip downloads on a cold cache).
START_TIMEOUT = 240.0

#: Blocks (page, first line) that a test runs, and where.
RUN = {
    ("README.md", "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/python -m wsecho"): "here",
    ("README.md", "curl http://127.0.0.1:8787/getCurrentConnections"): "here",
    ("README.md", ".venv/bin/python -m wsecho rooms --hibernate-after 5"): "here",
    ("tutorial.md", "python3 -m venv .venv && .venv/bin/pip install ."): "here",
    (
        "README.md",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && PYTHON=.venv/bin/python scripts/gate",
    ): ".ci/run reads this command from the README and runs it on every interpreter",
    ("tutorial.md", ".venv/bin/python -m pytest test_my_chat.py"): (
        "tests/integration/test_readme.py::test_the_chat_walkthrough_test_passes runs test_my_chat.py with pytest"
    ),
    ("tutorial.md", "scripts/install-browser && .venv/bin/python -m pytest tests/system/test_chat_browser.py"): (
        "the gate runs scripts/install-browser and then tests/system/test_chat_browser.py in the suite"
    ),
    (
        "deploying.md",
        "wsecho --host 127.0.0.1 --port 8787 --forwarded-allow-ips 127.0.0.1 --allowed-hosts chat.example.com",
    ): "tests/system/test_proxies.py starts wsecho with this command line",
}
#: Blocks no test runs, with the reason.
NOT_RUN = {
    ("operations.md", "VENV=/opt/wsecho/venv"): (
        "installs into /opt and starts a systemd unit as root; tests/system/test_systemd_unit.py runs "
        "its sed line against this venv and verifies the unit with systemd-analyze"
    ),
    ("performance.md", "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' picows"): (
        "benchmarks are not tests: minutes of load on a pinned CPU; scripts/bench is run by hand"
    ),
    ("mutation-testing.md", ".venv/bin/python scripts/mutate.py wsecho/core/idle.py tests/core/test_idle.py"): (
        "mutation testing is not a test: it runs the module's tests once per mutant, minutes of CPU; run by hand"
    ),
}


def blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for match in SHELL.finditer(page.read_text(encoding="utf-8")):
            body = match.group(1)
            found.append((page.name, body.splitlines()[0].strip(), body))
    return found


def test_every_shell_block_is_run_or_says_why_not():
    for page, first, _body in blocks():
        key = (page, first)
        assert key in RUN or key in NOT_RUN, f"a shell block in {page} that no test runs: {first!r}"
    listed = {(page, first) for page, first, _ in blocks()}
    assert set(RUN) | set(NOT_RUN) <= listed, "a listed block is no longer in the docs"


def body_of(page: str, first: str) -> str:
    (body,) = [b for p, f, b in blocks() if (p, f) == (page, first)]
    return body


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh copy of the tracked files, as a clone has them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy its tracked files")
    dest = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def start_block(command: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """Run a block that ends in a server; return it and the port it logged (bounded wait)."""
    proc = subprocess.Popen(
        ["sh", "-c", command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    assert proc.stdout is not None
    deadline = threading.Timer(START_TIMEOUT, stop, [proc])  # ends the output, so the loop ends
    deadline.start()
    try:
        for line in proc.stdout:  # pip's output, then the server's log
            seen.append(line)
            match = re.search(r"on http://127\.0\.0\.1:(\d+) ", line)
            if match:
                return proc, int(match.group(1))
    finally:
        deadline.cancel()
    stop(proc)
    pytest.fail("the block never served:\n" + "".join(seen[-40:]))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def interactive(command: str, cwd: Path) -> subprocess.Popen[str]:
    """An interactive client (``python -m websockets``), typed into and read like a terminal."""
    return subprocess.Popen(
        ["sh", "-c", command],
        cwd=cwd,
        env=user_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        bufsize=1,
    )


def read_until(proc: subprocess.Popen[str], wanted: str, timeout: float = 20.0) -> str:
    """What ``proc`` printed up to a line containing ``wanted`` (bounded: killed after ``timeout``)."""
    seen = []
    deadline = threading.Timer(timeout, stop, [proc])
    deadline.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if wanted in line:
                return "".join(seen)
    finally:
        deadline.cancel()
    pytest.fail(f"{wanted!r} never came:\n" + "".join(seen))


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WSECHO_", "VIRTUAL_ENV", "PYTHON"))}
    # python3 is the interpreter running this suite, as it is for a user of this venv's Python.
    env["PATH"] = f"{Path(sys.executable).resolve().parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def test_the_first_set_up_command_serves_and_the_echo_table_runs_as_written(checkout):
    setup = body_of("README.md", "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/python -m wsecho")
    proc, port = start_block(setup.strip(), checkout, user_env(WSECHO_PORT="0", WSECHO_DATA_DIR=":memory:"))
    try:
        echo_table = body_of("README.md", "curl http://127.0.0.1:8787/getCurrentConnections")
        lines = [line for line in echo_table.splitlines() if line.strip()]
        curl, expected = lines[0].replace("8787", str(port)), lines[1].lstrip("# ").strip()
        out = subprocess.run(["sh", "-c", curl], cwd=checkout, capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == expected
        client = lines[2].split("  #")[0].replace("8787", str(port))
        install = lines[2].split("# ", 1)[1]  # the comment says what the client needs: run it too
        subprocess.run(["sh", "-c", install], cwd=checkout, check=True, capture_output=True, timeout=240)
        typed, answer = lines[3].removeprefix("> "), lines[4].removeprefix("< ")
        user = interactive(client, checkout)
        try:
            read_until(user, "Connected to")
            assert user.stdin is not None
            user.stdin.write(typed + "\n")
            read_until(user, answer)
        finally:
            stop(user)
    finally:
        stop(proc)

    # The tutorial: rooms.py saved beside .venv as the README says, then its two commands.
    (rooms_py,) = re.findall(r"<!-- tutorial: rooms.py -->\n```python\n(.*?)```", README.read_text(), re.S)
    (checkout / "rooms.py").write_text(rooms_py)
    serve, client = body_of("README.md", ".venv/bin/python -m wsecho rooms --hibernate-after 5").splitlines()[:2]
    proc, port = start_block(serve, checkout, user_env(WSECHO_PORT="0", WSECHO_DATA_DIR=":memory:"))
    try:
        client = client.split("  #")[0].replace("8787", str(port))
        ann, bob = interactive(client, checkout), interactive(client, checkout)  # "in two terminals"
        try:
            read_until(ann, "Connected to")
            read_until(bob, "Connected to")
            assert ann.stdin is not None
            ann.stdin.write("hello kitchen\n")
            read_until(bob, "< hello kitchen")
        finally:
            stop(ann)
            stop(bob)
    finally:
        stop(proc)


def test_the_chat_tutorials_commands_serve_the_chat(checkout):
    block = body_of("tutorial.md", "python3 -m venv .venv && .venv/bin/pip install .")
    command = block.strip().replace("\n", " && ").replace("--admin-port 9787", "--admin-port 0")
    proc, port = start_block(command, checkout, user_env(WSECHO_PORT="0", WSECHO_DATA_DIR=":memory:"))
    try:
        out = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=30, check=True
        )
        assert "<html" in out.stdout.lower()  # the chat page
    finally:
        stop(proc)
