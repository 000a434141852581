"""The README and docs/ stay true: every code example runs, the tables match the code, links resolve.

A code example is a fenced block right after a marker ``<!-- KIND: NAME -->``; the KIND says
which test runs it (``EXAMPLE_KINDS``). Every ``python`` and ``toml`` block in README.md and
docs/*.md needs one, so an example nobody runs cannot be added by accident.
"""

import re
import subprocess
import sys
import textwrap
import tomllib
import traceback
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect

import wsecho
from tests.apps.outbound import Upstream
from wsecho import App, DurableObject, Request, Response, WebSocketPair
from wsecho.core.lifecycle import ObjectState, transition_tables_markdown
from wsecho.serve.appcode import load_app
from wsecho.serve.config import OPTIONS, Settings, parse
from wsecho.serve.server import Server
from wsecho.testing import receive, serve_app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Every Markdown file whose links must resolve.
LINKED = [*PAGES, *sorted((ROOT / "docs").glob("*/*.md")), ROOT / "CHANGELOG.md"]

MARKED = re.compile(r"<!-- ([a-z ]+): (\S+) -->\n```(\w+)\n(.*?)```", re.S)
FENCE = re.compile(r"^```(\w*)$", re.M)
#: The marker kinds and the test that runs each.
EXAMPLE_KINDS = {
    "tutorial": "test_tutorial_rooms_broadcast_and_survive_hibernation",
    "chat test": "test_the_chat_walkthrough_test_passes",
    "api example": "test_api_example_runs_in_a_handler",
    "sql example": "test_sql_example_runs_in_a_handler_and_its_data_survives_hibernation",
    "config file": "test_config_file_example_loads",
    "proxy config": "tests/system/test_proxies.py (nginx, haproxy, and the wsecho command line)",
    "tornado mount": "test_the_tornado_mount_example_serves_beside_its_own_handler",
    "outbound example": "test_the_relay_example_hibernates_between_upstream_messages",
}


def text(path):
    return path.read_text(encoding="utf-8")


def examples(kind):
    """(page, name, source) of every example marked ``<!-- kind: name -->``, in page order."""
    found = []
    for page in PAGES:
        for match in MARKED.finditer(text(page)):
            if match.group(1) == kind:
                example = (page, match.group(2), match.group(4))
                found.append(pytest.param(example, id=f"{page.name}:{match.group(2)}"))
    return found


def test_every_code_example_is_run_by_a_test():
    for page in PAGES:
        page_text = text(page)
        marked = {m.start(3) - 3 for m in MARKED.finditer(page_text)}  # where each marked fence opens
        fences = list(FENCE.finditer(page_text))
        openings = fences[0::2]  # fences alternate: opening, closing
        for fence in openings:
            if fence.group(1) not in ("python", "toml"):
                continue
            line = page_text.count("\n", 0, fence.start()) + 1
            assert fence.start() in marked, (
                f"{page.name}:{line}: a {fence.group(1)} block without a marker; "
                f"put <!-- KIND: NAME --> before it, KIND one of {sorted(EXAMPLE_KINDS)}"
            )
        for match in MARKED.finditer(page_text):
            assert match.group(1) in EXAMPLE_KINDS, f"{page.name}: no test runs <!-- {match.group(1)}: ... -->"


def test_the_docs_speak_of_the_package_only():
    # A user of the package has no SPEC and no ../shared folder: rules are said in words.
    for page in LINKED:
        if page.name == "CHANGELOG.md":
            continue  # history
        for needle in ("SPEC", "../shared", "shared/reference"):
            assert needle not in text(page), f"{page.relative_to(ROOT)} cites {needle!r}, which a user never sees"


def test_transition_tables_match_the_code():
    internals = text(ROOT / "docs" / "internals.md")
    section = internals.split("<!-- transition tables -->\n", 1)[1].split("<!-- end transition tables -->", 1)[0]
    assert section == transition_tables_markdown()


def test_the_running_table_documents_every_option():
    operations = text(ROOT / "docs" / "operations.md")
    section = operations.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    for opt in OPTIONS:
        row = f"| `{opt.flag}` | `{opt.env}` / `{opt.dest}` |"
        assert row in section, f"docs/operations.md's options table has no row for {opt.flag}"


# -- the tutorial: your first object ---------------------------------------------------------


@pytest.fixture(params=examples("tutorial"))
def rooms_module(request, tmp_path, monkeypatch):
    _, _, source = request.param
    (tmp_path / "readme_rooms.py").write_text(source)
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
        # Any other path, / too, is the lobby (it once went to a room named "http:").
        client = AsyncHTTPClient()
        for path in ("/", "/about", "/rooms/"):
            answer = await client.fetch(f"http://127.0.0.1:{server.port}{path}")
            assert answer.body == b"0 people here\n"
        assert sorted(h.id.name for h in server.runtime.hosts()) == ["kitchen", "lobby"]
        async with connect(f"ws://127.0.0.1:{server.port}/") as carol:
            answer = await client.fetch(f"http://127.0.0.1:{server.port}/")
            assert answer.body == b"1 person here\n"
            await carol.close()
    finally:
        await server.stop()


# -- the chat tutorial's test, run by pytest exactly as a user would ---------------------------


@pytest.mark.parametrize("example", examples("chat test"))
def test_the_chat_walkthrough_test_passes(tmp_path, example):
    _, name, source = example
    (tmp_path / name).write_text(source)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# -- the API page's snippets, each run as the body of a handler ---------------------------------


class Room(DurableObject):
    """What ``env.ROOMS`` holds in the snippets: an object with a fetch and an RPC method."""

    async def fetch(self, request):
        return Response("room")

    async def add_points(self, points):
        total = (await self.ctx.storage.get("points") or 0) + points
        await self.ctx.storage.put("points", total)
        return total


class Lab(DurableObject):
    """Runs a snippet as the body of its ``fetch``, with the names the snippets take as given.

    ``self`` is this object, ``ws`` its WebSocket (tags ``player`` and ``team:red``), ``team``
    ``"red"``, ``text`` an id of ``env.ROOMS`` as a string and ``request`` a request for it.
    """

    async def fetch(self, request):
        if request.headers.get("Upgrade", "").lower() == "websocket":
            client, server = WebSocketPair()
            self.ctx.accept_web_socket(server, ["player", "team:red"])
            return Response(status=101, web_socket=client)
        source = request.text()
        code = "async def snippet(self, env, ws, team, text, request):\n" + textwrap.indent(source, "    ")
        names = {name: getattr(wsecho, name) for name in wsecho.__all__}
        try:
            exec(compile(code, "<snippet>", "exec"), names)
            (ws,) = self.ctx.get_web_sockets("player")
            text = str(self.env.ROOMS.id_from_name("kitchen"))
            room_request = Request("http://any/rooms/kitchen")
            await names["snippet"](self, self.env, ws, "red", text, room_request)
        except Exception:
            return Response(traceback.format_exc(), status=500)
        return Response("ran")


async def lab_worker(request, env):
    return await env.LAB.get_by_name("lab").fetch(request)


@pytest.mark.gen_test
@pytest.mark.parametrize("example", examples("api example"))
async def test_api_example_runs_in_a_handler(example):
    page, name, source = example
    app = App(fetch=lab_worker, bindings={"LAB": Lab, "ROOMS": Room})
    async with serve_app(app) as t:
        await t.connect("/lab/websocket")
        answer = await t.fetch("/lab/run", method="POST", body=source)
        assert (answer.status, answer.body.decode()) == (200, "ran"), f"{page.name}: {name}"


class SqlLab(Lab):
    """The lab of a class with SQL storage (``ctx.storage.sql``)."""

    storage = "sql"


@pytest.mark.gen_test
@pytest.mark.parametrize("example", examples("sql example"))
async def test_sql_example_runs_in_a_handler_and_its_data_survives_hibernation(example, tmp_path):
    page, name, source = example
    app = App(fetch=lab_worker, bindings={"LAB": SqlLab, "ROOMS": Room})
    async with serve_app(app, data_dir=tmp_path) as t:
        await t.connect("/lab/websocket")
        for _ in range(2):  # the second run finds the first one's tables and rows
            answer = await t.fetch("/lab/run", method="POST", body=source)
            assert (answer.status, answer.body.decode()) == (200, "ran"), f"{page.name}: {name}"
            await t.settle()
            t.hibernate("LAB", "lab")
        assert await t.storage("LAB", "lab").get("last_seen") == 123


@pytest.mark.gen_test
async def test_the_relay_example_hibernates_between_upstream_messages(io_loop):
    ((_page, _name, code),) = [p.values[0] for p in examples("outbound example")]
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    upstream = Upstream()
    example = namespace["app"]
    app = App(fetch=example.fetch, bindings=example.bindings, vars={"FEED_URL": upstream.url()})
    try:
        async with serve_app(app) as t:
            client = await t.connect("/feed")
            await client.send("hello")
            await upstream.wait_for(lambda: upstream.received == ["hello"])
            assert await receive(client) == "echo:hello"
            await t.settle()
            t.hibernate("RELAY", "feed")
            upstream.peers[0].write_message("tick")
            assert await receive(client) == "tick"
            assert t.constructions("RELAY", "feed") == 2
            upstream.peers[0].close(1001)
            assert await receive(client) == "feed closed (1001)"
            await client.send("again")  # the next client message connects again
            await upstream.wait_for(lambda: upstream.received == ["hello", "again"])
            assert len(upstream.peers) == 1
    finally:
        await upstream.stop()


# -- the config file example ---------------------------------------------------------------


@pytest.mark.parametrize("example", examples("config file"))
def test_config_file_example_loads(tmp_path, example):
    page, name, source = example
    path = tmp_path / name
    path.write_text(source)
    settings, _ = parse(["--config", str(path)], {})
    for key, value in tomllib.loads(source).items():
        assert getattr(settings, key) == value, f"{page.name}: {name}: {key}"


# -- links --------------------------------------------------------------------------------------


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    in_fence = False
    for line in text(path).splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        heading = re.match(r"#{1,6} (.*)", line)
        if heading and not in_fence:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path):
    """(line, target) of every inline Markdown link or image outside code."""
    in_fence = False
    for number, line in enumerate(text(path).splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            yield number, target


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for line, target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{line}: {target} (no {file_part})")
        elif anchor and anchor not in anchors(resolved):
            broken.append(f"{line}: {target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.gen_test(timeout=20)
async def test_the_tornado_mount_example_serves_beside_its_own_handler():
    import tornado.httpserver
    import tornado.netutil
    from tornado.httpclient import AsyncHTTPClient

    ((_page, _name, code),) = [p.values[0] for p in examples("tornado mount")]
    namespace: dict = {}
    exec(compile(code, "docs/tornado.md", "exec"), namespace)
    rooms = namespace["rooms"]
    await rooms.start()
    (sock,) = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(namespace["application"])
    server.add_sockets([sock])
    port = sock.getsockname()[1]
    try:
        hello = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/hello")
        assert hello.body == b"the application's own handler\n"
        async with connect(f"ws://127.0.0.1:{port}/websocket") as ws:
            await ws.send("hi")
            assert "hi" in await ws.recv()
    finally:
        server.stop()
        await rooms.stop(timeout=2)
