"""scripts/systemd/wsecho.service: what the server needs from it, systemd's own verdict, its sandbox score."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsecho.serve.config import build_parser, settings_from

UNIT = Path(__file__).resolve().parents[2] / "scripts" / "systemd" / "wsecho.service"
# The console script pip installed with the interpreter running the tests.
CONSOLE_SCRIPT = Path(sys.executable).parent / "wsecho"
# systemd 252 calls exposure below 5.0 "OK"; lower bands are "SAFE" (and "PERFECT" at 0.0).
GOOD_LEVELS = {"OK", "SAFE", "PERFECT"}
MAX_EXPOSURE = 5.0
# "→" in a UTF-8 locale, "->" otherwise; matching from "Overall" on avoids caring.
OVERALL = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<score>\d+(?:\.\d+)?) (?P<level>[A-Z]+)")
EXEC_START = re.compile(r"^(?P<key>ExecStart=[-@:+!|]*)(?P<exe>\S+)(?P<args>.*)$", re.MULTILINE)


def parse_unit(text):
    """``{section: {key: [values]}}``: the keys systemd reads, repeated keys kept in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines make this test's parser lie: {raw!r}"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{raw!r} is outside any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service():
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def one(service, key):
    values = service.get(key)
    assert values, f"{key}= is missing"
    assert len(values) == 1, f"{key}= is given {len(values)} times: {values}"
    return values[0]


def seconds(text):
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    assert match, f"cannot read {text!r} as a time span"
    return int(match[1]) * (60 if match[2] == "min" else 1)


def systemd_analyze(*args):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): cannot check the unit")
    # A SYSTEMD_LOG_LEVEL from the caller's shell (debug, say) would fill stderr with noise.
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_LOG_LEVEL"}
    return subprocess.run(
        [tool, "--no-pager", *args],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )


#: Where the shipped unit expects the venv, and the docs' step that writes another path into it.
DEFAULT_VENV = "/opt/wsecho/venv"
INSTALL_LINE = re.compile(
    r'^sed "s\|/opt/wsecho/venv\|\$VENV\|g" scripts/systemd/wsecho.service > (?P<dest>\S+)$', re.M
)
OPERATIONS = UNIT.parents[2] / "docs" / "operations.md"


def documented_install_line():
    """The ``sed`` line docs/operations.md tells a user to run (the unit's header has the same)."""
    section = OPERATIONS.read_text(encoding="utf-8").split("\n## As a systemd service\n", 1)[1].split("\n## ", 1)[0]
    found = INSTALL_LINE.findall(section)
    assert len(found) == 1, "docs/operations.md's systemd section has no (or several) sed lines that install the unit"
    line = INSTALL_LINE.search(section)
    assert line[0] in UNIT.read_text(encoding="utf-8"), "the unit's header and the docs install it differently"
    return line


@pytest.fixture
def installed_unit(tmp_path):
    """The unit installed as docs/operations.md says, with VENV this venv (the tests' console script)."""
    if not CONSOLE_SCRIPT.is_file():
        pytest.skip(f"the wsecho console script is not installed at {CONSOLE_SCRIPT} (pip install -e .)")
    line = documented_install_line()
    # Same name: systemd derives the unit's name (and so its defaults) from the file name.
    path = tmp_path / UNIT.name
    command = line[0].replace(line["dest"], str(path))
    subprocess.run(
        ["bash", "-c", command],
        cwd=UNIT.parents[2],
        env={**os.environ, "VENV": str(CONSOLE_SCRIPT.parents[1])},
        check=True,
        timeout=30,
    )
    installed = path.read_text(encoding="utf-8")
    assert DEFAULT_VENV not in installed
    assert EXEC_START.search(installed)["exe"] == str(CONSOLE_SCRIPT)
    assert EXEC_START.search(installed)["args"] == EXEC_START.search(UNIT.read_text(encoding="utf-8"))["args"]
    return path


def test_systemd_analyze_verify_accepts_the_unit(installed_unit):
    # --recursive-errors=no: judge this unit, not whatever state the host's own units
    # (network-online.target and what it pulls in) are in; that is not ours to test.
    result = systemd_analyze("verify", "--recursive-errors=no", str(installed_unit))
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr
    about_unit = [line for line in stderr.splitlines() if installed_unit.name in line]
    assert about_unit == [], stderr


def test_systemd_analyze_verify_catches_a_missing_executable(tmp_path):
    # The check above can fail: a venv that is not there is caught.
    broken = tmp_path / UNIT.name
    broken.write_text(
        EXEC_START.sub(
            lambda m: f"{m['key']}{tmp_path / 'no-such-wsecho'}{m['args']}", UNIT.read_text(encoding="utf-8")
        ),
        encoding="utf-8",
    )
    result = systemd_analyze("verify", "--recursive-errors=no", str(broken))
    assert result.returncode != 0
    assert "no-such-wsecho" in result.stderr.decode("utf-8", "replace")


def test_the_sandbox_rates_ok_or_better(installed_unit):
    result = systemd_analyze("security", "--offline=yes", str(installed_unit))
    stdout = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    found = OVERALL.findall(stdout)
    assert len(found) == 1, stdout
    unit, score, level = found[0]
    assert unit == installed_unit.name
    assert float(score) < MAX_EXPOSURE, stdout
    assert level in GOOD_LEVELS, stdout


def test_the_score_parser_reads_both_arrows():
    for line in [
        "→ Overall exposure level for wsecho.service: 1.0 OK 🙂",
        "-> Overall exposure level for wsecho.service: 1.0 OK :-)",
    ]:
        assert OVERALL.findall(line) == [("wsecho.service", "1.0", "OK")]
    unsafe = "→ Overall exposure level for x.service: 9.6 UNSAFE 😨"
    assert OVERALL.findall(unsafe) == [("x.service", "9.6", "UNSAFE")]


def test_execstart_flags_are_ones_the_server_accepts(service):
    exec_start = one(service, "ExecStart")
    exe, *flags = exec_start.split()
    # A venv's console script, not a system-wide install of a package nobody can download.
    assert exe == f"{DEFAULT_VENV}/bin/wsecho"
    settings = settings_from(build_parser().parse_args(flags), {"STATE_DIRECTORY": "/var/lib/wsecho"})
    assert settings.admin_port == 9787
    assert settings.admin_host == "127.0.0.1"
    assert settings.log_format == "json"
    # The data directory is left to $STATE_DIRECTORY (StateDirectory=wsecho).
    assert "--data-dir" not in flags
    assert settings.data_dir == "/var/lib/wsecho"


def test_the_server_is_supervised_the_way_it_speaks(service):
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert seconds(one(service, "WatchdogSec")) > 0
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "RestartSec")) > 0
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "KillMode") in {"mixed", "control-group"}
    assert service.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    # Longer than the graceful drain the server does on SIGTERM, with room for the flush.
    drain = settings_from(build_parser().parse_args([]), {}).drain_timeout
    assert seconds(one(service, "TimeoutStopSec")) >= 2 * drain


def test_the_server_gets_its_state_directory_and_enough_file_descriptors(service):
    assert one(service, "StateDirectory") == "wsecho"
    assert one(service, "DynamicUser") == "yes"
    assert int(one(service, "LimitNOFILE")) >= 65536
    assert one(service, "UMask") == "0077"


def test_the_sandbox_leaves_the_network_usable(service):
    families = one(service, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    # The admin chooses who may connect (--host, a firewall): the unit denies no address.
    assert "IPAddressDeny" not in service
    assert "PrivateNetwork" not in service
    assert one(service, "CapabilityBoundingSet") == ""
    assert one(service, "AmbientCapabilities") == ""
