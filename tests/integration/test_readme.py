"""The README stays true: its transition tables and its tutorial code are the real ones."""

import re
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from wsecho.core.lifecycle import ObjectState, transition_tables_markdown
from wsecho.serve.cli import load_app
from wsecho.serve.config import Settings
from wsecho.serve.server import Server

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_transition_tables_match_the_code():
    section = README.split("<!-- transition tables -->\n", 1)[1].split("<!-- end transition tables -->", 1)[0]
    assert section == transition_tables_markdown()


def tutorial_source():
    match = re.search(r"<!-- tutorial: rooms.py -->\n```python\n(.*?)```", README, re.S)
    assert match, "the README has no tutorial block"
    return match.group(1)


@pytest.fixture
def rooms_module(tmp_path, monkeypatch):
    (tmp_path / "readme_rooms.py").write_text(tutorial_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    return "readme_rooms"


@pytest.mark.gen_test
async def test_tutorial_rooms_broadcast_and_survive_hibernation(rooms_module, io_loop):
    server = Server(load_app(rooms_module), Settings(port=0, hibernate_after=5, data_dir=":memory:"))
    await server.start()
    base = f"ws://127.0.0.1:{server.port}/rooms/kitchen/websocket"
    try:
        async with connect(base) as alice, connect(base) as bob:
            await alice.send("hi bob")
            assert await bob.recv() == "hi bob"
            assert server.runtime.sweep(now=io_loop.time() + 60) == 1
            assert server.runtime.find("ROOMS", "kitchen").lifecycle.state is ObjectState.HIBERNATING
            await bob.send("hi alice")
            assert await alice.recv() == "hi alice"
            await alice.close()
            assert alice.close_code == 1000
            assert alice.close_reason == "goodbye"
    finally:
        await server.stop()


def test_the_chat_walkthrough_test_passes(tmp_path):
    """The "Test it with wsecho.testing" example, run by pytest exactly as a user would."""
    import subprocess
    import sys

    match = re.search(r"<!-- chat test: test_my_chat.py -->\n```python\n(.*?)```", README, re.S)
    assert match, "the README has no chat test block"
    (tmp_path / "test_my_chat.py").write_text(match.group(1))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_chat.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_the_running_table_documents_every_option():
    from wsecho.serve.config import OPTIONS

    section = README.split("## Running it", 1)[1].split("**Precedence**", 1)[0]
    for opt in OPTIONS:
        row = f"| `{opt.flag}` | `{opt.env}` / `{opt.dest}` |"
        assert row in section, f"README's Running it table has no row for {opt.flag}"
