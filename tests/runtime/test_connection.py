"""The connection's own rules, with a stand-in runtime (no network)."""

import pytest

from tests.core.test_frames import client_frame
from tests.helpers import until
from wsecho.api.websocket import WebSocketPair
from wsecho.serve.connection import Connection, ConnectionSettings


class RecordingRuntime:
    def __init__(self):
        self.calls = []

    def message_received(self, ws, message):
        self.calls.append(("message", message))

    def transport_lost(self, ws):
        self.calls.append(("lost",))

    def socket_failed(self, ws, code, reason):
        self.calls.append(("failed", code))


def make_connection(runtime, max_message_size=1000):
    _client, server = WebSocketPair()
    return Connection(
        server,
        ConnectionSettings(runtime, max_message_size=max_message_size),
        b"",
        set(),
        url="ws://x/",
        protocol=None,
    )


def test_held_back_messages_are_dropped_when_the_connection_ended_meanwhile():
    runtime = RecordingRuntime()
    conn = make_connection(runtime)
    conn.backlog = [("text", "parsed before the drop")]
    conn.connection_lost(None)  # the peer went away while the socket was paused
    conn._resume()
    assert runtime.calls == [("lost",)]


def test_held_back_messages_are_delivered_when_reading_resumes():
    runtime = RecordingRuntime()
    conn = make_connection(runtime)

    class Transport:
        def is_closing(self):
            return False

        def resume_reading(self):
            runtime.calls.append(("resumed",))

    conn.transport = Transport()
    conn.backlog = [("text", "a"), ("text", "b")]
    conn._resume()
    assert runtime.calls == [("message", "a"), ("message", "b"), ("resumed",)]


class StreamTransport:
    """A stand-in transport that records reading pauses and what is written."""

    def __init__(self, log, name):
        self.log = log
        self.name = name
        self.written = []

    def is_closing(self):
        return False

    def pause_reading(self):
        self.log.append((self.name, "paused"))

    def resume_reading(self):
        self.log.append((self.name, "resumed"))

    def write(self, data):
        self.written.append(data)


@pytest.mark.gen_test
async def test_another_connections_message_is_handled_while_a_fragment_flood_is_parsed():
    runtime = RecordingRuntime()
    flood, other = make_connection(runtime, 1 << 20), make_connection(runtime)
    flood.transport = StreamTransport(runtime.calls, "flood")
    other.transport = StreamTransport(runtime.calls, "other")
    # One message in 60,000 one-byte fragments (420 kB, more than one read's worth of parsing)
    fragments = [client_frame(1, b"a", fin=False)] + [client_frame(0, b"a", fin=False)] * 59_998
    flood.data_received(b"".join([*fragments, client_frame(0, b"a")]))
    other.data_received(client_frame(1, b"quick"))  # the next socket the loop serves
    await until(lambda: ("message", "a" * 60_000) in runtime.calls)
    quick = runtime.calls.index(("message", "quick"))
    assert runtime.calls[0] == ("flood", "paused")
    assert quick < runtime.calls.index(("message", "a" * 60_000))
    assert runtime.calls[-1] == ("flood", "resumed")  # read again once its input is parsed
