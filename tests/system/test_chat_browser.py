"""A real browser: two headless Chromium pages chat through `python -m wsecho wsecho.examples.chat`.

The server runs as a subprocess with a short ``--hibernate-after``, so the room really
hibernates between steps (the admin listener's ``/objects`` and ``/metrics`` show it), and
Chromium (Debian's ``chromium``; ``scripts/install-browser`` installs it) is driven over its
DevTools protocol with the ``websockets`` client, so nothing else is needed. The page is used
as a person would: typing into its forms and pressing Enter. A screenshot of each page is
written to ``tests/artifacts/`` (git-ignored). Without Chromium the test is skipped, saying so.
"""

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ServerProcess

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WIDTH, HEIGHT = 960, 640
ADMIN = re.compile(r"admin listener on http://127\.0\.0\.1:(\d+) ")
DEVTOOLS = re.compile(rb"DevTools listening on (ws://\S+)")
#: What works here, as root and without a display or GPU; timers must not be throttled in
#: pages that are not in front, since two pages run at once.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    f"--window-size={WIDTH},{HEIGHT}",
    "--remote-debugging-port=0",
]
#: The whole scenario, Chromium's start included, must finish within this.
SCENARIO_TIMEOUT = 60


class BrowserError(Exception):
    pass


class Browser:
    """Headless Chromium over the DevTools protocol: one WebSocket, one session per page."""

    def __init__(self, proc, ws, stderr_tail):
        self.proc = proc
        self.ws = ws
        self.stderr_tail = stderr_tail
        self.ids = itertools.count(1)
        self.pending = {}
        self.waiters = []
        #: JavaScript errors and console.error() calls of every page.
        self.errors = []
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def launch(cls, executable, profile):
        from websockets.asyncio.client import connect

        # Its own process group, so that stopping it by its PID also stops its helpers.
        proc = await asyncio.create_subprocess_exec(
            executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        tail = []
        try:
            async with asyncio.timeout(20):
                while (match := DEVTOOLS.search(line := await proc.stderr.readline())) is None:
                    if not line:
                        raise BrowserError(f"chromium exited before it listened: {b''.join(tail).decode()}")
                    tail.append(line)
            ws = await connect(match[1].decode(), max_size=None, open_timeout=10)
        except BaseException:
            await stop_process_group(proc)
            raise
        browser = cls(proc, ws, tail)
        browser.drain = asyncio.ensure_future(browser._drain_stderr())
        return browser

    async def _drain_stderr(self):
        # Chromium logs to stderr; a full pipe would stall it.
        while line := await self.proc.stderr.readline():
            self.stderr_tail = [*self.stderr_tail[-50:], line]

    async def _read(self):
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    reply = self.pending.pop(message["id"], None)
                    if reply is None or reply.done():
                        continue
                    if "error" in message:
                        reply.set_exception(BrowserError(f"{message['error']}"))
                    else:
                        reply.set_result(message.get("result", {}))
                else:
                    self._event(message)
        except Exception as exc:  # the connection broke: every waiting command learns it below
            self.errors.append(f"DevTools connection: {exc!r}")
        finally:
            for reply in self.pending.values():
                if not reply.done():
                    reply.set_exception(BrowserError("the DevTools connection closed"))

    def _event(self, message):
        method, params, session = message["method"], message.get("params", {}), message.get("sessionId")
        if method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])
        for waiter in list(self.waiters):
            if waiter[0] == (session, method) and not waiter[1].done():
                waiter[1].set_result(params)
                self.waiters.remove(waiter)

    async def send(self, method, params=None, session=None, timeout=10):
        message_id = next(self.ids)
        reply = asyncio.get_running_loop().create_future()
        self.pending[message_id] = reply
        message = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            await self.ws.send(json.dumps(message))
            async with asyncio.timeout(timeout):
                return await reply
        finally:
            self.pending.pop(message_id, None)

    def expect(self, method, session):
        """A future for the next event ``method`` of ``session``: create it before the cause."""
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(((session, method), future))
        return future

    async def new_page(self):
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, target["targetId"], attached["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        # Both pages behave as if they had the focus, as two windows side by side would.
        await page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        return page

    async def close(self):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.send("Browser.close")
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        await stop_process_group(self.proc)
        self.drain.cancel()


async def stop_process_group(proc):
    """Stop the process and the helpers it started (its process group) by its PID; bounded."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # helpers left behind by a browser that exited


class Page:
    def __init__(self, browser, target_id, session):
        self.browser = browser
        self.target_id = target_id
        self.session = session

    async def send(self, method, params=None, timeout=10):
        return await self.browser.send(method, params, self.session, timeout)

    async def loading(self, action):
        """Run ``action`` (a coroutine function) and wait until the page it loads has loaded."""
        loaded = self.browser.expect("Page.loadEventFired", self.session)
        await action()
        async with asyncio.timeout(10):
            await loaded

    async def goto(self, url):
        await self.loading(lambda: self.send("Page.navigate", {"url": url}))

    async def reload(self):
        await self.loading(lambda: self.send("Page.reload"))

    async def evaluate(self, expression, timeout=10):
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout + 1,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description", details.get("text")))
        return result["result"].get("value")

    async def wait_for(self, condition, timeout=10):
        """Wait (in the page, at most ``timeout`` seconds) until the JavaScript ``condition`` is true."""
        await self.evaluate(
            f"""new Promise((resolve, reject) => {{
                const until = Date.now() + {timeout * 1000};
                (function check() {{
                    let value;
                    try {{ value = ({condition}); }} catch (e) {{ value = false; }}
                    if (value) return resolve(true);
                    if (Date.now() > until) return reject(new Error({json.dumps("timed out waiting for " + condition)}));
                    setTimeout(check, 20);
                }})();
            }})""",
            timeout=timeout,
        )

    async def type_into(self, selector, text):
        """Focus the field, select what it holds and type ``text`` over it, as a person would."""
        await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()"
        )
        await self.send("Input.insertText", {"text": text})

    async def press_enter(self):
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        await self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **key})
        await self.send("Input.dispatchKeyEvent", {"type": "keyUp", **key})

    async def say(self, text):
        await self.type_into("#text", text)
        await self.press_enter()

    async def texts(self):
        return await self.evaluate("[...document.querySelectorAll('#log li')].map((li) => li.lastChild.textContent)")

    async def screenshot(self, path):
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self):
        await self.browser.send("Target.closeTarget", {"targetId": self.target_id})


def has_text(text):
    return f"[...document.querySelectorAll('#log li')].some((li) => li.lastChild.textContent === {json.dumps(text)})"


def users_are(*names):
    return f"chat.state.users.join('|') === {json.dumps('|'.join(names))}"


@pytest.fixture
def chromium():
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium is not installed: run scripts/install-browser (as root, on Debian) to install it")
    return path


@pytest.fixture
def chat_server(tmp_path):
    server = ServerProcess(
        [
            "wsecho.examples.chat",
            "--port=0",
            "--admin-port=0",
            "--hibernate-after=1",
            f"--data-dir={tmp_path / 'data'}",
            "--access-log=off",
        ]
    )
    try:
        server.ready()
        server.admin_port = int(server.wait_for(ADMIN).group(1))
        yield server
    finally:
        server.stop()


def admin_get(server, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}{path}", timeout=5) as response:
        return response.read().decode()


def metric(server, name):
    found = re.search(rf"^{name} (\S+)$", admin_get(server, "/metrics"), re.MULTILINE)
    assert found is not None, name
    return float(found[1])


def room_state(server, room):
    listed = json.loads(admin_get(server, "/objects"))["objects"]
    return next((o["state"] for o in listed if o["name"] == room), None)


async def until_hibernating(server, room, timeout=10):
    """Wait (bounded) until the server's /objects shows ``room`` hibernating."""
    async with asyncio.timeout(timeout):
        while await asyncio.to_thread(room_state, server, room) != "hibernating":
            await asyncio.sleep(0.05)  # another process: /objects has no event to wait on


@pytest.mark.gen_test(timeout=SCENARIO_TIMEOUT + 10)
async def test_two_browsers_chat_while_the_room_hibernates(chromium, chat_server, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    async with asyncio.timeout(SCENARIO_TIMEOUT):
        browser = await Browser.launch(chromium, tmp_path / "profile")
        try:
            await conversation(browser, chat_server)
        except BaseException:
            tail = b"".join(browser.stderr_tail[-10:]).decode(errors="replace")
            print(f"chromium's last log lines:\n{tail}\nserver log:\n{''.join(chat_server.seen)}")
            raise
        finally:
            await browser.close()


async def conversation(browser, server):
    ann, bob = await browser.new_page(), await browser.new_page()

    # ann starts at the front page, picks a name and a room, and lands in the room
    await ann.goto(server.url("/"))
    assert await ann.evaluate("document.getElementById('join').hidden") is False
    await ann.type_into("#name", "ann")
    await ann.type_into("#room", "kitchen")
    await ann.loading(ann.press_enter)
    assert await ann.evaluate("location.pathname") == "/rooms/kitchen"
    await ann.wait_for(f"chat.state.status === 'connected' && {users_are('ann')}")

    # bob opens the room's link and is asked only for his name
    await bob.goto(server.url("/rooms/kitchen"))
    assert await bob.evaluate("document.getElementById('room-field').hidden") is True
    await bob.type_into("#name", "bob")
    await bob.press_enter()
    await bob.wait_for(f"chat.state.status === 'connected' && {users_are('ann', 'bob')}")
    await ann.wait_for(users_are("ann", "bob"))

    await ann.say("hello bob")
    await bob.wait_for(has_text("hello bob"))
    await bob.say("hi ann")
    await ann.wait_for(has_text("hi ann"))

    # Nobody talks: the room hibernates (--hibernate-after 1), the pages stay connected.
    await until_hibernating(server, "kitchen")
    wakes = metric(server, "wsecho_wakes_total")
    pongs = metric(server, "wsecho_auto_responses_total")
    await ann.evaluate("chat.keepAlive()")  # what the page does every 20 s
    await ann.wait_for("chat.state.pongs >= 1")
    assert metric(server, "wsecho_auto_responses_total") >= pongs + 1
    assert metric(server, "wsecho_wakes_total") == wakes  # answered without waking the room
    assert room_state(server, "kitchen") == "hibernating"

    # Messages still flow both ways; the room's constructor ran again to deliver them.
    await ann.say("did you nap?")
    await bob.wait_for(has_text("did you nap?"))
    assert metric(server, "wsecho_wakes_total") >= wakes + 1
    await until_hibernating(server, "kitchen")
    await bob.say("the room did")
    await ann.wait_for(has_text("the room did"))
    conversation = ["hello bob", "hi ann", "did you nap?", "the room did"]
    assert await ann.texts() == conversation

    # bob reloads: same name (the tab keeps it), the history comes back from storage
    await bob.reload()
    await bob.wait_for(f"chat.state.status === 'connected' && chat.state.messages === 4 && {users_are('ann', 'bob')}")
    assert await bob.texts() == conversation
    assert await bob.evaluate("document.getElementById('who').textContent") == "bob"
    await ann.wait_for(users_are("ann", "bob"))

    await ann.screenshot(ARTIFACTS / "chat-ann.png")
    await bob.screenshot(ARTIFACTS / "chat-bob.png")

    # bob types too fast: the room's error frame shows on his page. His name's bucket (5 per
    # 10 s) is in the room's storage, so the reload did not refill it: what he said before
    # counts, and only the messages that got tokens reach ann.
    for i in range(6):
        await bob.say(f"quick {i}")
    slow = "chat.state.errors.filter((e) => e.startsWith('slow down: at most 5 messages per 10 seconds')).length"
    quick = (
        "[...document.querySelectorAll('#log li')].filter((li) => li.lastChild.textContent.startsWith('quick')).length"
    )
    await bob.wait_for(f"{slow} >= 1 && {slow} + {quick} === 6")
    assert await bob.evaluate("document.getElementById('error').hidden") is False
    await bob.screenshot(ARTIFACTS / "chat-rate-limited.png")
    sent = [text for text in await bob.texts() if text.startswith("quick")]
    await ann.wait_for(has_text(sent[-1]))
    assert [text for text in await ann.texts() if text.startswith("quick")] == sent
    assert await ann.evaluate("document.getElementById('count').textContent") == "(2)"

    # ann closes her page: bob sees her leave
    await ann.close()
    await bob.wait_for(f"{users_are('bob')} && chat.state.count === 1")
    assert browser.errors == []
