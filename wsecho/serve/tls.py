"""TLS: the server's certificate (loaded, checked, reloaded) and the transport that serves a
WebSocket's frames over the ``ssl.SSLSocket`` Tornado negotiated.

Tornado's SSLIOStream does the TLS handshake and reads the upgrade request. After the 101 the
TLS session lives in that SSLSocket, which neither asyncio nor uvloop can adopt; so instead of
handing a descriptor to ``loop.connect_accepted_socket`` (the plain path), the take-over hands
the SSLSocket to a :class:`TLSTransport`: the asyncio ``Transport`` that
:class:`~wsecho.serve.connection.Connection` already speaks, driven by the loop's
``add_reader``/``add_writer`` (docs/decisions/0004-tls.md says why, with measurements).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from wsecho.core.errors import ConfigError

log = logging.getLogger(__name__)

#: Decrypted bytes read per wake-up, handed to the protocol in one piece, before the loop
#: serves the others (fairness; the Connection parses in passes of its own as well).
READ_PASS_BYTES = 256 * 1024
#: What one ``recv`` asks for: OpenSSL hands back at most one TLS record (16 KiB) per call.
RECV_BYTES = 64 * 1024
#: The most one ``send`` passes to OpenSSL (four TLS records).
WRITE_CHUNK = 64 * 1024
_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


def check_readable(flag: str, path: str) -> None:
    """A :class:`ConfigError` naming ``flag`` and ``path`` when the file cannot be read (OpenSSL's
    own errors do not say which file)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}", f"cannot read it: {exc.strerror}") from None


def load_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context with ``certfile``'s chain and ``keyfile``'s key; a one-line
    :class:`ConfigError` naming the file when either cannot be read or they do not match."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # Renegotiation would let a write wait for a read (TLS 1.2); nothing here needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    for flag, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        check_readable(flag, path)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        msg = f"not a PEM certificate chain with the matching private key in --keyfile {keyfile} ({exc.reason})"
        raise ConfigError(f"--certfile {certfile}", msg) from None
    return context


def verifying_context(flag: str, ca_file: str) -> ssl.SSLContext:
    """A client context that checks a server's certificate and host name against ``ca_file``'s
    CAs (empty: the system's); a :class:`ConfigError` naming ``flag`` and the file when it
    cannot be read or holds no certificate."""
    if not ca_file:
        return ssl.create_default_context()
    check_readable(flag, ca_file)
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        msg = f"not a PEM file of CA certificates ({exc.reason})"
        raise ConfigError(f"{flag} {ca_file}", msg) from None


class TLSTransport(asyncio.Transport):
    """An asyncio transport over an established non-blocking ``ssl.SSLSocket``.

    What :class:`~wsecho.serve.connection.Connection` uses of a transport: ``write`` (sent at
    once when nothing waits, else buffered until the socket is writable), flow control
    (``pause_writing`` past the high-water mark, ``resume_writing`` at the low one),
    ``pause_reading``/``resume_reading``, ``close`` (after the buffer drained, with a TLS
    close_notify), ``abort``, ``get_write_buffer_size``; no half-close (``can_write_eof``
    is false: TLS has no FIN of its own, as for asyncio's SSL transport).

    A write that OpenSSL could not finish must be retried with the same bytes at its start
    and at least as many (``SSL_write``; Python sets ACCEPT_MOVING_WRITE_BUFFER): the buffer
    is only ever cut at the front by what ``send`` reports written and grows at the back, and
    each send passes its first ``WRITE_CHUNK`` bytes, so each retry starts where the failed
    attempt did and is no shorter.
    """

    __slots__ = ("_buffer", "_closing", "_fd", "_high", "_loop", "_low", "_paused", "_protocol", "_reading", "_sock")

    def __init__(self, sock: ssl.SSLSocket, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__({"peername": sock.getpeername(), "socket": sock, "ssl_object": sock})
        self._sock: ssl.SSLSocket | None = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._loop = loop
        self._buffer = bytearray()
        self._closing = False
        self._reading = True
        self._paused = False  # whether the protocol's writing is paused
        self._high = 64 * 1024
        self._low = 16 * 1024
        loop.add_reader(self._fd, self._read_ready)
        protocol.connection_made(self)
        # Bytes already decrypted inside the SSLSocket wake no one: read them now.
        loop.call_soon(self._read_ready)

    # -- reading -------------------------------------------------------------------------

    def _read_ready(self) -> None:
        """Read the records that are here, up to a pass's budget, and hand them over at once.

        OpenSSL returns one TLS record (at most 16 KiB) per ``recv``; the records of one wake-up
        go to ``data_received`` joined, as a plain transport's one read would, so that a large
        frame reaches the parser in a few large pieces rather than in a thousand small ones.
        """
        sock = self._sock
        if sock is None or not self._reading:
            return
        chunks: list[bytes] = []
        size = 0
        eof = False
        while size < READ_PASS_BYTES:
            try:
                data = sock.recv(RECV_BYTES)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self._fatal(exc)
                return
            if not data:  # the peer's close_notify, or its FIN (ragged EOFs are suppressed)
                eof = True
                break
            chunks.append(data)
            size += len(data)
        if chunks:
            try:
                self._protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except Exception as exc:  # like asyncio's transports: the connection ends, the loop goes on
                log.error("the protocol failed on data received; closing the TLS connection", exc_info=True)
                self._fatal(exc)
                return
        if eof:
            if self._sock is not None:
                self._eof()
        elif size >= READ_PASS_BYTES:
            self._loop.call_soon(self._read_ready)  # more may be here; the others' turn first

    def _eof(self) -> None:
        self.pause_reading()
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if self._reading and self._sock is not None:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and self._sock is not None and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
            if self._sock.pending():
                self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._sock
        if sock is None or self._closing:
            return
        if self._buffer:
            self._buffer += data
        else:
            if len(data) <= WRITE_CHUNK:  # a message: one send, no copy (the echo's path)
                try:
                    sent = sock.send(data)
                except _WOULD_BLOCK:
                    sent = 0
                except OSError as exc:
                    self._fatal(exc)
                    return
                if sent == len(data):
                    return
                self._buffer += memoryview(data)[sent:]
            else:
                self._buffer += data
                self._send_buffered()
                if not self._buffer or self._sock is None:
                    return
            self._loop.add_writer(self._fd, self._write_ready)
        if not self._paused and len(self._buffer) > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _send_buffered(self) -> None:
        """Send queued bytes, a chunk at a time, until the socket would block.

        In chunks so that a write OpenSSL could not finish holds at most one chunk that may
        have left already (the queue size the slow-reader ledger reads is then at most a chunk
        high), and a retry passes at least the bytes of the attempt before it.
        """
        sock = self._sock
        buffer = self._buffer
        while buffer and sock is not None:
            try:
                with memoryview(buffer) as view:
                    sent = sock.send(view[:WRITE_CHUNK])
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                self._fatal(exc)
                return
            del buffer[:sent]  # (O(1) at a bytearray's front)

    def _write_ready(self) -> None:
        self._send_buffered()
        if self._sock is None:
            return
        if self._paused and len(self._buffer) <= self._low:
            self._paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None, notify=True)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        msg = "TLS has no half-close (can_write_eof() is false)"
        raise NotImplementedError(msg)

    # -- closing -------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._sock is None

    def close(self) -> None:
        """Send what is queued, then close_notify and close (``connection_lost`` follows)."""
        if self._closing or self._sock is None:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._finish(None, notify=True)

    def abort(self) -> None:
        """Close at once; what is queued is dropped."""
        if self._sock is not None:
            self._closing = True
            self._finish(None, notify=False)

    def _fatal(self, exc: Exception) -> None:
        log.debug("TLS connection failed: %s", exc)
        self._closing = True
        self._finish(exc, notify=False)

    def _finish(self, exc: Exception | None, *, notify: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._reading = False
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._buffer.clear()
        if notify:
            with contextlib.suppress(OSError, ValueError):
                sock.unwrap()  # close_notify (RFC 8446 §6.1); the peer's answer is not awaited
        sock.close()
        # Like asyncio's transports: connection_lost runs from the loop, never inside a call
        # the protocol made (close() and abort() are called from its own methods).
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_protocol(self) -> Any:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol
