"""The sd_notify client, against real AF_UNIX datagram sockets standing in for systemd."""

import logging
import os
import re
import socket
import threading
import uuid
from types import MappingProxyType

import pytest

from wsecho.serve.sdnotify import Notifier

# Every wait on a datagram is bounded by this.
RECV_TIMEOUT = 5.0


def _receiver(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(RECV_TIMEOUT)
    return sock


@pytest.fixture
def systemd(tmp_path):
    """A datagram socket in tmp_path playing systemd's notify socket; yields (socket, NOTIFY_SOCKET)."""
    path = tmp_path / "notify"
    sock = _receiver(str(path))
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_systemd():
    """The same on a unique abstract-namespace name; yields (socket, NOTIFY_SOCKET with '@')."""
    name = f"wsecho-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    yield sock, "@" + name
    sock.close()


def assert_nothing_received(sock):
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.mark.parametrize("fixture", ["systemd", "abstract_systemd"])
def test_each_message_arrives_exactly(request, fixture):
    sock, notify_socket = request.getfixturevalue(fixture)
    with Notifier.from_environ({"NOTIFY_SOCKET": notify_socket}) as notifier:
        assert notifier.enabled
        for call, expected in [
            (notifier.ready, b"READY=1"),
            (notifier.stopping, b"STOPPING=1"),
            (notifier.reloading, b"RELOADING=1"),
            (notifier.watchdog, b"WATCHDOG=1"),
            (lambda: notifier.status("serving 3 sockets"), b"STATUS=serving 3 sockets"),
            (lambda: notifier.status("two\nlines\r\n"), b"STATUS=two lines"),
            (lambda: notifier.status("é ünïcode"), "STATUS=é ünïcode".encode()),
            (lambda: notifier.send("READY=1", "STATUS=up", "MAINPID=42"), b"READY=1\nSTATUS=up\nMAINPID=42"),
        ]:
            assert call() is True
            assert sock.recv(4096) == expected
    assert_nothing_received(sock)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_one_lazy_socket_serves_every_message_and_close_closes_it(systemd):
    sock, notify_socket = systemd
    before = open_fds()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket})
    assert open_fds() == before
    for _ in range(3):
        notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    assert open_fds() == before + 1
    notifier.close()
    assert open_fds() == before
    assert notifier.ready() is False
    assert open_fds() == before
    assert_nothing_received(sock)


def test_watchdog_interval_is_half_of_watchdog_usec(systemd):
    _, notify_socket = systemd
    base = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000"}
    assert Notifier.from_environ(base).watchdog_interval == pytest.approx(0.1)
    ours = {**base, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(ours).watchdog_interval == pytest.approx(0.1)


@pytest.mark.parametrize(
    "extra",
    [
        # systemd watches another process (our parent here): the variables were inherited.
        {"WATCHDOG_PID": "<parent>"},
        {"WATCHDOG_PID": "not-a-pid"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": ""},
    ],
)
def test_watchdog_not_for_us(systemd, extra):
    _, notify_socket = systemd
    if extra.get("WATCHDOG_PID") == "<parent>":
        extra = {"WATCHDOG_PID": str(os.getppid())}
    environ = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000", **extra}
    assert Notifier.from_environ(environ).watchdog_interval is None


def test_no_watchdog_without_watchdog_usec(systemd):
    _, notify_socket = systemd
    assert Notifier.from_environ({"NOTIFY_SOCKET": notify_socket}).watchdog_interval is None


def test_without_notify_socket_everything_is_a_no_op(systemd):
    sock, _ = systemd
    environ_before = dict(os.environ)
    # Read-only: from_environ must not unset anything (the variables are inherited by
    # whatever the server starts, and the caller owns them).
    notifier = Notifier.from_environ(MappingProxyType({"WATCHDOG_USEC": "200000"}))
    assert not notifier.enabled
    # No socket to ping, so no interval: the server need not schedule pings.
    assert notifier.watchdog_interval is None
    results = [
        notifier.ready(),
        notifier.stopping(),
        notifier.reloading(),
        notifier.watchdog(),
        notifier.status("x"),
        notifier.send("READY=1"),
    ]
    assert results == [False] * 6
    notifier.close()
    assert_nothing_received(sock)
    assert dict(os.environ) == environ_before


def test_from_environ_does_not_change_its_mapping(systemd):
    _, notify_socket = systemd
    environ = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    with Notifier.from_environ(MappingProxyType(environ)) as notifier:
        assert notifier.ready()
    assert environ == {
        "NOTIFY_SOCKET": notify_socket,
        "WATCHDOG_USEC": "200000",
        "WATCHDOG_PID": str(os.getpid()),
    }


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_an_address_systemd_would_refuse_disables_it_with_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING, logger="wsecho.systemd"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert [r.name for r in caplog.records] == ["wsecho.systemd"]


def test_a_missing_socket_does_not_raise_and_warns_once(tmp_path, caplog):
    gone = tmp_path / "no-such-socket"
    with (
        caplog.at_level(logging.DEBUG, logger="wsecho.systemd"),
        Notifier.from_environ({"NOTIFY_SOCKET": str(gone)}) as notifier,
    ):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.status("still here") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "wsecho.systemd"
    assert str(gone) in warnings[0].getMessage()


def test_warns_again_after_recovering(tmp_path, caplog):
    path = tmp_path / "notify"
    with (
        caplog.at_level(logging.WARNING, logger="wsecho.systemd"),
        Notifier.from_environ({"NOTIFY_SOCKET": str(path)}) as notifier,
    ):
        assert notifier.ready() is False
        sock = _receiver(str(path))
        try:
            assert notifier.ready() is True
            assert sock.recv(4096) == b"READY=1"
        finally:
            sock.close()
        path.unlink()
        assert notifier.ready() is False
    assert len(caplog.records) == 2


def test_a_full_queue_drops_the_message_instead_of_blocking(systemd):
    sock, notify_socket = systemd
    results = []
    with Notifier.from_environ({"NOTIFY_SOCKET": notify_socket}) as notifier:
        # Nobody reads: the receiver's queue fills up (Linux's default is short). A blocking
        # send would hang, so it runs on a thread the test can give up on.
        sender = threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(10_000)))
        sender.start()
        sender.join(RECV_TIMEOUT)
        blocked = sender.is_alive()
        if blocked:
            sock.close()  # wakes a blocked sendto (ECONNREFUSED), so the thread ends
            sender.join(RECV_TIMEOUT)
    assert not blocked, "a send blocked on a full queue"
    assert results[0] is True
    assert results[-1] is False


@pytest.mark.parametrize(
    ("assignments", "error"),
    [
        ((), "needs at least one"),
        (("READY",), "is NAME=value, got 'READY'"),
        (("=1",), "is NAME=value, got '=1'"),
        (("STATUS=a\nREADY=1",), "must not contain a newline"),
    ],
)
def test_a_malformed_assignment_is_a_bug_and_raises(assignments, error):
    # Even without a service manager, so the bug shows up outside systemd too.
    notifier = Notifier.from_environ({})
    with pytest.raises(ValueError, match=re.escape(error)):
        notifier.send(*assignments)
