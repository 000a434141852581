"""The tests' PostgreSQL server (tests/pg.py) goes with the test run that started it, even when
that run is killed: scripts/mutate.py stops a run that timed out by SIGKILL to its process group."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pg import _alive, find_binaries

pytestmark = pytest.mark.skipif(find_binaries() is None, reason="PostgreSQL is not installed")

RUN = """
import sys
from tests.conftest import start_postgres
fixture = start_postgres()  # kept: a generator dropped would stop the server at once
server = next(fixture)
print(server.base, server.postmaster_pid(), flush=True)
sys.stdin.read()  # until the test kills this process group
"""


def processes_under(base: Path) -> list[int]:
    """The live processes whose command line names ``base`` (the server's data directory is in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_killing_the_test_runs_process_group_stops_its_postgresql_server():
    root = Path(__file__).resolve().parents[2]
    run = subprocess.Popen(
        [sys.executable, "-c", RUN],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as scripts/mutate.py forks each run
    )
    try:
        line = run.stdout.readline()  # the server is ready
        base, pid = line.split()
        assert _alive(int(pid))
        assert processes_under(Path(base))
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        run.stdout.close()
        run.stdin.close()
    deadline = time.monotonic() + 10
    while processes_under(Path(base)) and time.monotonic() < deadline:
        # The processes were killed with the group; only their reaping by init is left to wait for.
        time.sleep(0.02)
    left = processes_under(Path(base))
    for escaped in left:  # do not leave them running for the next test
        os.kill(escaped, signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)
    assert not left, f"PostgreSQL processes outlived the killed test run: {left}"
