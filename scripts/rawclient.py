"""HTTP and WebSocket over raw sockets, so that every byte the server sends is seen as sent.

The clients of ``scripts/spec-rows`` and ``scripts/smoke-test``: one HTTP/1.1 request per
connection (:func:`http`), and a WebSocket that sends masked frames and reads one frame at
a time (:class:`Ws`). Each answer comes back as one comparable line of text. Standard
library only; every socket operation is bounded by :data:`TIMEOUT`.
"""

from __future__ import annotations

import base64
import os
import socket
import struct

TIMEOUT = 5.0


def recv_some(sock: socket.socket, what: str) -> bytes:
    """The next bytes; a server that closes the connection instead is an error, not an endless loop."""
    chunk = sock.recv(65536)
    if not chunk:
        msg = f"the server closed the connection before the end of {what}"
        raise ConnectionError(msg)
    return chunk


def read_head(sock: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """(the response head, the bytes after it)."""
    while b"\r\n\r\n" not in data:
        data += recv_some(sock, "the response head")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def http(host: str, port: int, method: str, path: str, headers: dict[str, str]) -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, body = read_head(sock, b"")
        status = head.split(b"\r\n", 1)[0].split(b" ", 2)[1].decode()
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode().partition(":")
            fields[name.strip().lower()] = value.strip()
        if status == "101":
            return "101"
        while len(body) < int(fields.get("content-length", "0")):
            body += recv_some(sock, "the body")
    return f"{status} [{fields.get('content-type', '')}] {body.decode(errors='replace')!r}"


class Ws:
    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head, self.buf = read_head(self.sock, b"")
        self.status = head.split(b" ", 2)[1].decode()

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> str:
        try:
            b0, b1 = self._read(2)
        except (EOFError, OSError) as exc:
            return f"connection ended ({type(exc).__name__})"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        payload = self._read(n)
        opcode = b0 & 0x0F
        if opcode == 0x8:
            if len(payload) >= 2:
                return f"close {struct.unpack('!H', payload[:2])[0]} {payload[2:].decode()!r}"
            return "close (no status)"
        kind = {1: "text", 2: "binary", 9: "ping", 10: "pong"}.get(opcode, f"op{opcode}")
        return f"{kind} {payload!r}"

    def close(self) -> None:
        self.sock.close()
