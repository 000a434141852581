"""The connection's own rules, with a stand-in runtime (no network)."""

from wsecho.connection import Connection, ConnectionSettings
from wsecho.websocket import WebSocketPair


class RecordingRuntime:
    def __init__(self):
        self.calls = []

    def message_received(self, ws, message):
        self.calls.append(("message", message))

    def transport_lost(self, ws):
        self.calls.append(("lost",))

    def socket_failed(self, ws, code, reason):
        self.calls.append(("failed", code))


def make_connection(runtime):
    _client, server = WebSocketPair()
    return Connection(
        server, ConnectionSettings(runtime, max_message_size=1000), b"", set(), url="ws://x/", protocol=None
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
