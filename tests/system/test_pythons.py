"""CI runs the suite on every CPython from 3.11 up that the machine has (.ci/run), and the smoke
test finds the wsecho a user means (scripts/smoke-test)."""

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ci_list(env=None):
    """``.ci/run --list`` as (version, path) pairs."""
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--list"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    return [tuple(line.split(" ", 1)) for line in done.stdout.splitlines()]


def minor(version):
    return ".".join(version.split(".")[:2])


def test_ci_runs_every_supported_python_this_machine_has():
    listed = [minor(version) for version, _ in ci_list()]
    assert listed == sorted(set(listed), key=lambda v: tuple(map(int, v.split("."))))
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert this in listed, f"the suite runs on Python {this} ({sys.executable}), which .ci/run would not run"
    # Every pyenv version the machine image brings (3.11 and up) is run.
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for found in sorted(root.glob("versions/3.*/bin/python3")):
        match = re.fullmatch(r"(3\.\d+)\.\d+", found.parents[1].name)
        if match and tuple(map(int, match.group(1).split("."))) >= (3, 11):
            assert match.group(1) in listed, f"{found} is not in .ci/run --list"
    # What CI runs is what the package claims, and the reverse where the machine has it.
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    claimed = re.findall(r"Programming Language :: Python :: (3\.\d+)", cfg["metadata"]["classifiers"])
    assert set(listed) <= set(claimed), f"add a classifier to setup.cfg for {sorted(set(listed) - set(claimed))}"
    assert {"3.11", "3.12", "3.13"} <= set(claimed)


def fake_python(path, answer):
    """An executable that answers .ci/run's question the way an interpreter would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{answer}\n")
    path.chmod(0o755)


def test_ci_finds_interpreters_on_path_and_in_pyenv_one_per_minor_version(tmp_path):
    pyenv, bin_ = tmp_path / "pyenv", tmp_path / "bin"
    # The README's python3 comes first and wins its minor version.
    fake_python(bin_ / "python3", "echo cpython 3 11 3.11.2 /usr/bin/python3.11")
    for version in ("3.10.13", "3.11.9", "3.12.4", "3.13.1"):
        major, minor_, _ = version.split(".")
        answer = f"echo cpython {major} {minor_} {version} {pyenv}/versions/{version}/bin/python3"
        fake_python(pyenv / "versions" / version / "bin" / "python3", answer)
    fake_python(pyenv / "versions" / "pypy3.10-7.3.12" / "bin" / "python3", "echo pypy 3 10 3.10.12 /pypy")
    # A pyenv shim of a version that is not selected fails: skipped, 3.12 still comes from pyenv.
    fake_python(bin_ / "python3.12", "echo 'pyenv: python3.12: command not found' >&2; exit 127")
    fake_python(bin_ / "python3.14", "echo cpython 3 14 3.14.0 /opt/python3.14")
    fake_python(bin_ / "python3.13-config", "echo cpython 3 15 3.15.0 /not-an-interpreter")
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "basename", "dirname", "sort", "timeout"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": f"{bin_}:{tools}", "PYENV_ROOT": str(pyenv), "HOME": str(tmp_path)}
    assert ci_list(env) == [
        ("3.11.2", "/usr/bin/python3.11"),
        ("3.12.4", f"{pyenv}/versions/3.12.4/bin/python3"),
        ("3.13.1", f"{pyenv}/versions/3.13.1/bin/python3"),
        ("3.14.0", "/opt/python3.14"),
    ]


def fake_wsecho(directory, version):
    """A wsecho that tells its version and fails to start (status 3)."""
    fake_python(directory / "wsecho", f'[ "$1" = --version ] && {{ echo "wsecho {version}"; exit 0; }}; exit 3')


@pytest.mark.parametrize(
    ("present", "chosen", "where"),
    [
        (("venv", "beside", "clone", "path"), "venv", "the active venv, $VIRTUAL_ENV"),
        (("beside", "clone", "path"), "beside", "beside "),
        (("clone", "path"), "clone", "this clone's .venv"),
        (("path",), "path", "on PATH"),
    ],
)
def test_the_smoke_test_tests_the_wsecho_a_user_means_and_says_which(tmp_path, present, chosen, where):
    # Issue 13: run as the docs say, it answered "the wsecho command is not installed"
    # although it was, in .venv; and it never said which wsecho it tested.
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    for name in ("smoke-test", "rawclient.py"):
        shutil.copy(ROOT / "scripts" / name, clone / "scripts" / name)
    interpreter = tmp_path / "python" / "bin" / "python3"
    interpreter.parent.mkdir(parents=True)
    interpreter.symlink_to(getattr(sys, "_base_executable", sys.executable))
    dirs = {
        "venv": tmp_path / "active" / "bin",
        "beside": interpreter.parent,
        "clone": clone / ".venv" / "bin",
        "path": tmp_path / "on-path",
    }
    for name in present:
        dirs[name].mkdir(parents=True, exist_ok=True)
        fake_wsecho(dirs[name], f"1.0-{name}")
    env = {"PATH": f"{dirs['path']}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if "venv" in present:
        env["VIRTUAL_ENV"] = str(tmp_path / "active")
    done = subprocess.run(
        [str(interpreter), str(clone / "scripts" / "smoke-test")], capture_output=True, text=True, timeout=60, env=env
    )
    lines = done.stdout.splitlines()
    assert lines[0] == f"     testing {dirs[chosen] / 'wsecho'} (wsecho 1.0-{chosen}; {where}" + (
        f"{interpreter})" if chosen == "beside" else ")"
    )
    assert "FAIL wsecho exited with status 3 before it was ready" in lines
    assert done.returncode == 1


def test_the_smoke_test_says_where_it_looked_when_there_is_no_wsecho(tmp_path):
    scripts = tmp_path / "clone" / "scripts"
    scripts.mkdir(parents=True)
    for name in ("smoke-test", "rawclient.py"):
        shutil.copy(ROOT / "scripts" / name, scripts / name)
    interpreter = tmp_path / "python" / "bin" / "python3"
    interpreter.parent.mkdir(parents=True)
    interpreter.symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {"PATH": f"{tmp_path / 'empty'}:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(interpreter), str(scripts / "smoke-test")], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.stdout.startswith("FAIL found no wsecho command: not in $VIRTUAL_ENV/bin, beside this Python")
    assert done.returncode == 1
