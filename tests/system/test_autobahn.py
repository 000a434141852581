"""Autobahn|Testsuite cases 1-10 against the mirror application, through ``scripts/autobahn``.

Real time passes here (about 15 s: the 6.4.x cases wait on purpose, 9.x moves up to 16 MiB
messages). The script starts ``python -m wsecho wsecho.examples.mirror`` on a free loopback
port, runs the cases with kosoku and stops the server. Deselect with ``-m "not autobahn"``.

Cases 12.* and 13.* (permessage-deflate; the script serves with ``--compression on``) take
minutes, so they are a separate test, marked ``autobahn_compression``, that runs only with
``WSECHO_AUTOBAHN_COMPRESSION=1``: CI runs it once, not on every interpreter.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "autobahn"
#: The script's bound on the kosoku run, and ours on the whole script (server start and stop too).
KOSOKU_TIMEOUT = 300
SCRIPT_TIMEOUT = KOSOKU_TIMEOUT + 90
#: The bound on the kosoku run of 12.* and 13.*: 216 cases, many of them thousands of messages.
COMPRESSION_TIMEOUT = 1500
SUMMARY = re.compile(r"autobahn: (\d+) passed, (\d+) failed")


def run_script(*args: str, bound: float = SCRIPT_TIMEOUT) -> tuple[int, str]:
    """Run scripts/autobahn; on our timeout stop it (SIGTERM, then its whole process group)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the server and kosoku can be stopped with it
    )
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script then stops its server and kosoku itself
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        pytest.fail(f"scripts/autobahn did not finish within {bound}s; its output:\n{out[-4000:]}")
    return proc.returncode, out


def run_cases(cases: str, reports: Path, minimum: int, timeout: int = KOSOKU_TIMEOUT) -> None:
    """Run ``cases`` with scripts/autobahn; no case may fail, and at least ``minimum`` must run."""
    if importlib.util.find_spec("kosoku") is None:
        pytest.skip("kosoku is not installed (it is in the test extra: pip install -e '.[test]')")
    status, out = run_script("--cases", cases, "--report", str(reports), "--timeout", str(timeout), bound=timeout + 90)
    lines = out.splitlines()
    summary = SUMMARY.fullmatch(lines[-1]) if lines else None
    assert summary is not None, f"scripts/autobahn ended without its summary (status {status}):\n{out[-4000:]}"
    failing = [line for line in lines if line.startswith("FAILED")]
    counts = next((line for line in lines if line.startswith("OK: ")), "")
    assert int(summary.group(2)) == 0, (
        f"{summary.group(2)} Autobahn cases FAILED ({counts}):\n"
        + "\n".join(failing)
        + f"\n(kosoku's reports and the server's log are in {reports})"
    )
    assert int(summary.group(1)) >= minimum, f"too few cases ran:\n{out[-4000:]}"
    assert status == 0, f"scripts/autobahn exited with status {status}:\n{out[-4000:]}"


@pytest.mark.autobahn
def test_autobahn_cases_1_to_10_have_no_failures(tmp_path):
    run_cases("1-10", tmp_path / "reports", minimum=251)


@pytest.mark.autobahn_compression
@pytest.mark.skipif(
    os.environ.get("WSECHO_AUTOBAHN_COMPRESSION") != "1",
    reason="Autobahn 12.* and 13.* (permessage-deflate) take minutes: CI runs them once, with "
    "WSECHO_AUTOBAHN_COMPRESSION=1 pytest -m autobahn_compression",
)
def test_autobahn_compression_cases_12_and_13_have_no_failures(tmp_path):
    run_cases("12-13", tmp_path / "reports", minimum=216, timeout=COMPRESSION_TIMEOUT)
