"""Test helpers: an event recorder, a probe application and a raw-frame client.

The fake clock is the public one, ``wsecho.testing.FakeClock``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import re
import struct
import subprocess
import sys
import threading
import urllib.request
from urllib.parse import urlsplit

import pytest

from wsecho import App, DurableObject, Response, WebSocketPair


async def until(predicate, timeout: float = 5.0, step: float = 0.005) -> None:
    """Poll ``predicate`` (bounded) for state that has no event to await, like a dropped TCP peer."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)


class FakeTransport:
    """Records the frames a socket sends, for tests that run the runtime without a network."""

    def __init__(self):
        self.frames = []

    def send_message(self, message):
        self.frames.append(("message", message))

    def send_close(self, code, reason):
        self.frames.append(("close", code, reason))


def constructions(recorder, name):
    """The constructor runs a test object recorded for the object ``name``."""
    return [e for e in recorder.of("constructor") if e[1] == name]


class Recorder:
    """Collects what objects saw; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._changed = asyncio.Event()

    def record(self, *event) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]

    async def wait_for(self, predicate, timeout: float = 5.0):
        """Wait (bounded) until ``predicate(self)`` is true; return its value."""
        async with asyncio.timeout(timeout):
            while not (result := predicate(self)):
                self._changed.clear()
                await self._changed.wait()
        return result


class Probe(DurableObject):
    """An object that records every event; its commands let tests steer it."""

    def __init__(self, ctx, env) -> None:
        super().__init__(ctx, env)
        self.rec = env.REC
        self.memory: list[str] = []
        self.rec.record("constructor", ctx.id.name, len(ctx.get_web_sockets()))
        if env.FLAGS.get("constructor_raises"):
            raise RuntimeError("constructor failed on purpose")

    async def fetch(self, request):
        path = urlsplit(request.url).path
        if path.endswith("/ws"):
            client, server = WebSocketPair()
            self.ctx.accept_web_socket(server)
            if self.env.FLAGS.get("send_early"):
                server.send("early")
            return Response(status=101, web_socket=client)
        if path.endswith("/wait"):
            await self.env.FLAGS["gate"]
            return Response("done")
        if path.endswith("/count"):
            return Response(str(len(self.ctx.get_web_sockets())))
        return Response("probe", status=200)

    def web_socket_message(self, ws, message):
        self.rec.record("message", message)
        if message == "raise":
            raise RuntimeError("handler failed on purpose")
        if message == "memory":
            ws.send(json.dumps(self.memory))
            return None
        if message == "close-me":
            ws.close(4000, "bye")
            return None
        if message == "close-then-send":
            ws.close(4001, "closing")
            try:
                ws.send("after close")
            except RuntimeError as exc:
                self.rec.record("send-raised", str(exc))
            return None
        if message == "send-after-close":
            try:
                ws.send("late")
            except RuntimeError as exc:
                self.rec.record("send-raised", str(exc))
            return None
        if message == "async":
            return self._async_echo(ws, message)
        self.memory.append(message)
        ws.send(f"echo:{message}" if isinstance(message, str) else b"echo:" + message)
        return None

    async def _async_echo(self, ws, message):
        await asyncio.sleep(0)
        ws.send(f"async:{message}")

    def web_socket_close(self, ws, code, reason, was_clean):
        self.rec.record("close", code, reason, was_clean, len(self.ctx.get_web_sockets()))
        if self.env.FLAGS.get("close_reply"):
            ws.close(code, "probe closing")

    def web_socket_error(self, ws, error):
        self.rec.record("error", error.code, error.reason)


async def probe_worker(request, env):
    # /obj/<name>/... goes to the object <name>
    parts = urlsplit(request.url).path.split("/")
    name = parts[2] if len(parts) > 2 and parts[1] == "obj" else "default"
    return await env.PROBE.get_by_name(name).fetch(request)


def probe_app(recorder: Recorder, **flags) -> App:
    return App(fetch=probe_worker, bindings={"PROBE": Probe}, vars={"REC": recorder, "FLAGS": flags})


class RawClient:
    """A WebSocket client that writes and reads raw frames, for what libraries refuse to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status: int | None = None
        self.headers: dict[str, str] = {}

    @classmethod
    async def connect(cls, port: int, path: str = "/websocket", extra: str = "", ssl=None) -> RawClient:
        if ssl is None:
            ssl = getattr(port, "tls", None)  # the tests' port of a server that serves TLS
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        client = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode().split("\r\n")
        client.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                client.headers[name.strip().lower()] = value.strip()
        return client

    def send_frame(self, opcode: int, payload: bytes = b"", fin: bool = True) -> None:
        mask = os.urandom(4)
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    def send_close(self, code: int | None = None, reason: bytes = b"") -> None:
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send_frame(0x8, payload)

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame as ``(opcode, payload)``; ``(-1, b"")`` when the connection ended."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        except asyncio.IncompleteReadError:
            return -1, b""
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return opcode, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def read_close(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Skip to the server's Close frame; its ``(code, reason)``, code None when empty."""
        while True:
            opcode, payload = await self.read_frame(timeout)
            if opcode == 0x8:
                if len(payload) < 2:
                    return None, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
            if opcode == -1:
                raise ConnectionError("connection ended without a Close frame")

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the server to end the TCP connection, then release it."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)
        finally:
            self.abort()

    def abort(self) -> None:
        self.writer.transport.abort()


LISTENING = re.compile(r"on https?://127\.0\.0\.1:(\d+) ")


class ServerProcess:
    """A wsecho subprocess whose log lines a test can wait for (bounded)."""

    def __init__(self, args, cwd=None, env=None, preexec_fn=None):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsecho", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,  # a test may lower the child's limits (setrlimit)
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.port = 0

    def ready(self):
        self.port = int(self.wait_for(LISTENING).group(1))
        return self

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern, timeout=10.0):
        """The first line (from now on) that matches ``pattern``; fails after ``timeout``."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern.pattern!r} within {timeout}s; saw {self.seen}")
            self.seen.append(line)
            if match := pattern.search(line):
                return match

    def url(self, path, scheme="http"):
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def get(self, path):
        with urllib.request.urlopen(self.url(path), timeout=5) as response:
            return response.status, response.read().decode(), response.headers

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.close_output()

    def close_output(self):
        """Close the output pipe once the reader thread has seen its end (bounded): closing it
        under the thread would make it raise (children that inherited the pipe may still write)."""
        self._pump_thread.join(timeout=5)
        self.proc.stdout.close()
