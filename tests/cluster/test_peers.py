"""RPC and fetch between objects on different members of a cluster (docs/decisions/0012):
members on one real PostgreSQL, in process and as a real process, real HTTP between them."""

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.apps import workers_app
from tests.cluster.test_members import aget, name_moving_to, until
from tests.integration.test_tls import Certs, trusting
from tests.integration.test_workers_mesh import ROOM
from tests.pg import free_port
from wsecho.backends.leases import PostgresLeases
from wsecho.core.errors import ConfigError, NotOwnerError
from wsecho.core.leases import rendezvous_owner
from wsecho.core.placement import slot_of
from wsecho.serve.config import Settings, build_parser, settings_from, split_peer_address
from wsecho.serve.peers import SIGNATURE, error_from, error_state, sign
from wsecho.serve.server import Server, peer_address

TTL = 1.0
SECRET = "a shared secret"
ROOT = Path(__file__).resolve().parents[2]


async def start(dsn: str, member: str, secret: str = SECRET, address: str | None = None, **settings) -> Server:
    server = Server(
        workers_app.app,
        Settings(**{"port": 0, "data_dir": ":memory:", "lease_ttl": TTL, "cluster_secret": secret, **settings}),
        leases=PostgresLeases(dsn, member, address=address),
    )
    await server.start()
    return server


async def started(dsn: str, *members: str, **settings) -> list[Server]:
    servers = [await start(dsn, m, **settings) for m in members]
    await until(lambda: all(s.cluster.ready() and len(s.cluster.members) == len(members) for s in servers))
    return servers


def owned_by(*owners: tuple[str, set[str]]) -> str:
    """A room name whose slot each (member, members) gives to that member."""
    for i in range(5000):
        slot = slot_of(ROOM.id_from_name(f"room{i}").hex)
        if all(rendezvous_owner(slot, members) == member for member, members in owners):
            return f"room{i}"
    raise AssertionError


def stub(server: Server, name: str):
    return server.runtime.namespaces["ROOM"].get_by_name(name)


def holds(server: Server, name: str) -> bool:
    return server.cluster.table.provable(slot_of(ROOM.id_from_name(name).hex), server.cluster.clock())


async def stop(*servers):
    for server in servers:
        if server is not None and server.phase != "stopped":
            await server.stop(timeout=1)


@pytest.mark.gen_test(timeout=60)
async def test_an_object_calls_and_fetches_an_object_another_member_serves(postgres_url):
    a, b = await started(postgres_url, "A", "B")
    try:
        caller = name_moving_to("A", {"A", "B"}, prefix="from")
        callee = name_moving_to("B", {"A", "B"}, prefix="to")
        # The worker's fetch on A runs A's object, whose RPC calls reach B's object.
        status, body = await aget(a.port, f"/rpc/{caller}/{callee}")
        assert status == 200, body
        report = json.loads(body)
        assert report["add"] == {"sum": 6, "pid": os.getpid(), "blob": "00ff", "tuple": [1, 2]}
        assert report["fail"] == "LookupError: nothing under that name"  # the callee's error, same kind
        assert "an argument of echo() cannot be sent to the member that owns the object" in report["echo_set"]
        assert "the result of leak() cannot be sent" in report["leak"]
        assert ROOM.id_from_name(callee) in {h.id for h in b.runtime.hosts()}
        assert ROOM.id_from_name(callee) not in {h.id for h in a.runtime.hosts()}  # one instance, on B
        # A plain fetch from A's worker fetch to B's object.
        status, body = await aget(a.port, f"/room/{callee}")
        assert status == 200
        assert body.startswith(f"{callee} {os.getpid()} 0 ")
        # A WebSocket is not carried between members: the load balancer routes it.
        with pytest.raises(InvalidStatus, match="HTTP 503"):
            await connect(f"ws://127.0.0.1:{a.port}/room/{callee}")
        # Counted on both sides (wsecho_peer_calls_total): the caller's "failed" are the two
        # values the codec could not carry (echo_set's argument is refused before any call).
        sent, answered = a.runtime.stats.snapshot().peer_calls, b.runtime.stats.snapshot().peer_calls
        assert sent["out", "error"] == answered["in", "error"] >= 1  # fail()'s LookupError
        assert sent["out", "ok"] == answered["in", "ok"] >= 2
        assert answered["in", "refused"] == answered["in", "not_owner"] == 0
        assert 'wsecho_peer_calls_total{direction="out",result="ok"}' in (await a.metrics_page()).decode()
    finally:
        await stop(a, b)


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.gen_test(timeout=60)
async def test_a_call_without_the_clusters_secret_is_refused_and_logged(postgres_url, caplog):
    caplog.set_level(logging.WARNING, "wsecho.peers")
    a = await start(postgres_url, "A", secret="")  # no secret: it neither calls nor answers
    b = await start(postgres_url, "B", secret="not the same")
    c = None
    try:
        await until(lambda: a.cluster.ready() and b.cluster.ready() and len(a.cluster.members) == 2)
        on_b = name_moving_to("B", {"A", "B"})
        on_a = name_moving_to("A", {"A", "B"})
        status, body = await aget(a.port, f"/room/{on_b}")
        assert status == 503
        assert "calls between members need the same --cluster-secret on every member" in body.replace("\n", " ")
        status, body = await aget(b.port, f"/room/{on_a}")
        assert status == 503
        assert "refused the call: this member takes no calls from other members: it has no --cluster-secret" in body
        assert "refused a call from 127.0.0.1 to /.wsecho/fetch: this member has no --cluster-secret" in caplog.text

        # Unsigned, and signed with another secret: 403, logged once a minute at most.
        caplog.clear()
        loop = asyncio.get_running_loop()
        unsigned = await loop.run_in_executor(None, post, b.port, "/.wsecho/call", b"j[]", {})
        assert unsigned == (403, "refused: the call is not signed with this cluster's --cluster-secret")
        signed = {SIGNATURE: sign(b"not the same", "/.wsecho/call", b"j[]")}
        malformed = await loop.run_in_executor(None, post, b.port, "/.wsecho/call", b"j[]", signed)
        assert malformed == (400, "a malformed call: not [namespace, id, name, ...]")
        c = await start(postgres_url, "C", secret="a third secret")
        await until(lambda: c.cluster.ready() and len(b.cluster.members) == 3)
        on_b = name_moving_to("B", {"A", "B", "C"})
        with pytest.raises(NotOwnerError, match="refused the call: refused: the call is not signed"):
            await stub(c, on_b).hit()
        assert caplog.text.count("refused a call from 127.0.0.1 to /.wsecho/call") == 1
        assert a.runtime.stats.peer_calls["in", "refused"] == 1  # B's fetch (A has no secret)
        assert b.runtime.stats.peer_calls["in", "refused"] == 3  # unsigned, malformed, C's
        assert c.runtime.stats.peer_calls["out", "failed"] == 1
        assert "no signature (not our --cluster-secret)" in caplog.text
        assert "1 more like it" not in caplog.text  # the second is held back, counted in the next line
        assert SECRET not in caplog.text
        assert "a third secret" not in caplog.text
    finally:
        await stop(a, b, c)


@pytest.mark.gen_test(timeout=90)
async def test_a_call_reaches_the_new_owner_once_when_members_leave_and_join(postgres_url):
    a, b, c = await started(postgres_url, "A", "B", "C")
    b2 = None
    try:
        # Served by B among A, B and C; by C once B is gone.
        callee = owned_by(("B", {"A", "B", "C"}), ("C", {"A", "C"}))
        hits, first = await stub(a, callee).hit()
        assert hits == 1  # on B
        await stop(b)  # B leaves: its slots move to C, which takes them on its next round
        hits, second = await asyncio.wait_for(stub(a, callee).hit(), 2 * TTL + 5)
        assert (hits, second != first) == (1, True)  # a new instance, on C, called once
        assert holds(c, callee)
        assert ROOM.id_from_name(callee) not in {h.id for h in a.runtime.hosts()}

        b2 = await start(postgres_url, "B")  # B is back: the slot returns to it from C
        await until(lambda: holds(b2, callee))
        hits, third = await asyncio.wait_for(stub(a, callee).hit(), 2 * TTL + 5)  # C answers "not owner" first
        assert (hits, third not in (first, second)) == (1, True)
        assert c.runtime.stats.peer_calls["in", "not_owner"] >= 1
        assert a.runtime.stats.peer_calls["out", "retry"] >= 1
        assert ROOM.id_from_name(callee) in {h.id for h in b2.runtime.hosts()}
    finally:
        await stop(a, b, c, b2)


@contextlib.contextmanager
def member_process(postgres_url: str, tmp_path: Path, *extra: str):
    """Member B as a real process (``wsecho tests.apps.workers_app``); yields its admin port."""
    port, admin = free_port(), free_port()
    command = [
        sys.executable, "-m", "wsecho", "tests.apps.workers_app", "--port", str(port), "--admin-port", str(admin),
        "--storage", postgres_url, "--member-name", "B", "--lease-ttl", "3", "--cluster-secret", SECRET, *extra,
    ]  # fmt: skip
    with (tmp_path / "b.log").open("wb") as log:
        b = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield b, admin
        finally:
            os.kill(b.pid, signal.SIGCONT)
            b.terminate()
            try:
                b.wait(20)
            except subprocess.TimeoutExpired:
                b.kill()
                b.wait(10)


async def until_ready(admin: int) -> None:
    async with asyncio.timeout(60):
        while (await aget(admin, "/readyz"))[0] != 200:
            await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=90)
async def test_a_call_to_a_stopped_owner_fails_within_the_call_timeout(postgres_url, tmp_path):
    a = None
    with member_process(postgres_url, tmp_path) as (b, admin):
        try:
            a = await start(postgres_url, "A", lease_ttl=3.0, cluster_call_timeout=2.0)
            await until(lambda: a.cluster.ready() and len(a.cluster.members) == 2, timeout=30)
            await until_ready(admin)
            callee = name_moving_to("B", {"A", "B"})
            assert (await stub(a, callee).hit())[0] == 1  # served by the process B
            os.kill(b.pid, signal.SIGSTOP)
            message = r"member B at 127.0.0.1:\d+, which holds its lease, did not answer within 2s"
            with pytest.raises(NotOwnerError, match=message):
                await asyncio.wait_for(stub(a, callee).hit(), 10)
        finally:
            os.kill(b.pid, signal.SIGCONT)
            await stop(a)


@pytest.mark.gen_test(timeout=120)
async def test_a_call_to_a_machine_with_workers_reaches_the_worker_that_owns_the_object(postgres_url, tmp_path):
    a = None
    with member_process(postgres_url, tmp_path, "--workers", "2") as (_, admin):
        try:
            a = await start(postgres_url, "A", lease_ttl=3.0)
            await until(lambda: a.cluster.ready() and len(a.cluster.members) == 3, timeout=60)
            await until_ready(admin)
            everyone = {"A", "B#0", "B#1"}
            # Both workers share the port: one connection reaches one of them, which passes the
            # other's call on over the machine's mesh.
            names = [owned_by(("B#0", everyone)), owned_by(("B#1", everyone))]
            for name in names:
                first, instance = await stub(a, name).hit()
                assert first == 1
                assert await stub(a, name).hit() == [2, instance]  # one instance, wherever the call landed
        finally:
            await stop(a)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--cluster-secret", "s", "--host", "0.0.0.0"],
            "--cluster-address: --host 0.0.0.0 listens on every interface, so the other members of the cluster "
            "cannot be told where to reach this one: give --cluster-address HOST:PORT",
        ),
        (["--cluster-address", "0.0.0.0:8787"], "must be HOST:PORT that the other members can reach"),
        (["--cluster-address", "web1"], "must be HOST:PORT that the other members can reach"),
    ],
)
def test_a_member_that_cannot_say_where_to_reach_it_does_not_start(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from(build_parser().parse_args(["app:app", *argv]), {})


def test_the_secret_is_never_in_the_settings_repr():
    settings = settings_from(build_parser().parse_args(["app:app"]), {"WSECHO_CLUSTER_SECRET": "hunter2"})
    assert settings.cluster_secret == "hunter2"
    assert "hunter2" not in repr(settings)


def test_a_callees_exception_comes_back_as_its_class_only_when_loaded_here():
    assert type(error_from(error_state(LookupError("gone")))) is LookupError
    again = error_from(error_state(NotOwnerError("moved", "ab")))
    assert (type(again), str(again)) == (NotOwnerError, "moved")
    unknown = error_from(["not.loaded.anywhere", "Boom", "bang"])
    assert (type(unknown), str(unknown)) == (RuntimeError, "Boom: bang")


# -- TLS on the peer channel (docs/decisions/0013) ----------------------------------------


def tls_of(certs: Certs) -> dict[str, str]:
    """A member's settings for a TLS listener with ``certs``, trusting their CA for its calls."""
    ca_file = certs.certfile.replace("cert.pem", "ca.pem")
    certs.ca.cert_pem.write_to_path(ca_file)
    return {"certfile": certs.certfile, "keyfile": certs.keyfile, "cluster_ca_file": ca_file}


def https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.gen_test(timeout=60)
async def test_members_with_tls_on_their_listeners_call_each_other_over_tls(postgres_url, tmp_path):
    certs = Certs(tmp_path)
    a, b = await started(postgres_url, "A", "B", **tls_of(certs))
    try:
        assert b.cluster.store.address == f"https://127.0.0.1:{b.port}"  # advertised with its scheme
        caller = name_moving_to("A", {"A", "B"}, prefix="from")
        callee = name_moving_to("B", {"A", "B"}, prefix="to")
        loop, client = asyncio.get_running_loop(), trusting(certs.ca)
        # A real client through A's TLS listener: A's object calls B's over TLS.
        status, body = await loop.run_in_executor(None, https_get, a.port, f"/rpc/{caller}/{callee}", client)
        assert status == 200, body
        assert json.loads(body)["add"]["sum"] == 6
        status, body = await loop.run_in_executor(None, https_get, a.port, f"/room/{callee}", client)
        assert (status, body.startswith(f"{callee} {os.getpid()} ")) == (200, True), body  # a fetch across
        assert ROOM.id_from_name(callee) in {h.id for h in b.runtime.hosts()}
        assert ROOM.id_from_name(callee) not in {h.id for h in a.runtime.hosts()}
        sent, answered = a.runtime.stats.peer_calls, b.runtime.stats.peer_calls
        assert sent["out", "ok"] == answered["in", "ok"] >= 2  # add() and the fetch
        assert sent["out", "error"] == answered["in", "error"] >= 1  # fail()
        assert sent["out", "failed"] == answered["in", "refused"] == 0
    finally:
        await stop(a, b)


@pytest.mark.gen_test(timeout=60)
async def test_a_certificate_that_does_not_verify_fails_the_call_naming_why(postgres_url, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "wsecho.peers")
    (tmp_path / "b").mkdir()
    (tmp_path / "other").mkdir()
    certs = Certs(tmp_path / "b")
    # B's certificate names localhost only, not the 127.0.0.1 it is called at.
    certs.ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(certs.certfile)
    b_settings = tls_of(certs)
    b_settings["keyfile"] = certs.certfile  # the key is in the same PEM
    wrong = tls_of(Certs(tmp_path / "other"))["cluster_ca_file"]  # another CA
    b = await start(postgres_url, "B", **b_settings)
    a = await start(postgres_url, "A", cluster_ca_file=b_settings["cluster_ca_file"])  # trusts B's CA
    c = await start(postgres_url, "C", cluster_ca_file=wrong)
    try:
        members = {"A", "B", "C"}
        await until(lambda: all(s.cluster.ready() and len(s.cluster.members) == 3 for s in (a, b, c)))
        on_b = name_moving_to("B", members)
        at = rf"member B at https://127\.0\.0\.1:{b.port} cannot be called: its certificate does not verify: "
        for _ in range(2):
            with pytest.raises(NotOwnerError, match=at + "IP address mismatch"):
                await stub(a, on_b).hit()
        with pytest.raises(NotOwnerError, match=at + "unable to get local issuer certificate .--cluster-ca-file."):
            await stub(c, on_b).hit()
        assert a.runtime.stats.peer_calls["out", "failed"] == 2
        assert c.runtime.stats.peer_calls["out", "failed"] == 1
        assert b.runtime.stats.peer_calls["in", "ok"] == 0
        warned = "cannot call member B at https://127.0.0.1:%d over the peer channel: its certificate does not verify"
        assert caplog.text.count(warned % b.port) == 2  # once a minute per caller and member: A's second is held
    finally:
        await stop(a, b, c)


@pytest.mark.gen_test(timeout=60)
async def test_a_plain_call_to_a_tls_listener_and_a_tls_call_to_a_plain_one_name_the_mismatch(postgres_url, tmp_path):
    # B has TLS but is advertised without the scheme (as an address of another release reads);
    # C is plain but advertised as https://.
    b_port, c_port = free_port(), free_port()
    b = await start(postgres_url, "B", address=f"127.0.0.1:{b_port}", port=b_port, **tls_of(Certs(tmp_path)))
    c = await start(postgres_url, "C", address=f"https://127.0.0.1:{c_port}", port=c_port)
    a = await start(postgres_url, "A")
    try:
        members = {"A", "B", "C"}
        await until(lambda: all(s.cluster.ready() and len(s.cluster.members) == 3 for s in (a, b, c)))
        plain = rf"member B at 127\.0\.0\.1:{b_port} failed: .* \(a TLS listener drops a plain HTTP call so: "
        with pytest.raises(
            NotOwnerError, match=plain + rf"with --certfile its address is https://127\.0\.0\.1:{b_port}\)"
        ):
            await stub(a, name_moving_to("B", members)).hit()
        # A plain listener waits for a request line, so the handshake times out (retried, like a connect).
        tls = rf"member C at https://127\.0\.0\.1:{c_port} cannot be reached: no TLS handshake within 2s \(is its "
        with pytest.raises(NotOwnerError, match=tls + r"listener plain HTTP, without --certfile\?\)"):
            await stub(a, name_moving_to("C", members)).hit()
        assert a.runtime.stats.peer_calls["out", "failed"] == 2
    finally:
        await stop(a, b, c)


def test_a_cluster_ca_file_that_cannot_be_read_stops_the_start_with_status_2(tmp_path):
    missing = tmp_path / "missing.pem"
    command = [sys.executable, "-m", "wsecho", "tests.apps.workers_app", "--port", "0", "--data-dir", ":memory:"]
    done = subprocess.run(
        [*command, "--cluster-ca-file", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert f"--cluster-ca-file {missing}: cannot read it: No such file or directory" in done.stderr


def test_a_tls_member_is_advertised_with_its_scheme_and_never_as_plain_http():
    def settings(*argv):
        return settings_from(build_parser().parse_args(["app:app", *argv]), {})

    tls = ("--certfile", "c.pem", "--keyfile", "k.pem")
    assert peer_address(settings(*tls, "--cluster-address", "10.0.0.11:8787"), []) == "https://10.0.0.11:8787"
    assert peer_address(settings("--cluster-address", "10.0.0.11:8787"), []) == "10.0.0.11:8787"
    assert peer_address(settings("--cluster-address", "https://[::1]:8787"), []) == "https://[::1]:8787"
    assert split_peer_address("https://[::1]:8787") == (True, "::1", 8787)
    assert split_peer_address("web1:8787") == (False, "web1", 8787)
    with pytest.raises(ConfigError, match="is plain HTTP, but with --certfile the application listener takes only TLS"):
        settings(*tls, "--cluster-address", "http://10.0.0.11:8787")
