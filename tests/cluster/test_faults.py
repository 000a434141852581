"""Three wsecho hosts, PostgreSQL and HAProxy, each in a network namespace of its own, with
clients through HAProxy, under the faults a cluster meets: a process killed, a process
paused past its lease, a host cut off from PostgreSQL, a host cut off from HAProxy, a
rolling restart. After each fault every room is served again within the bound the docs
state (the lease ttl plus BOUND); over the whole run the checker (tests/cluster/history.py)
finds no two overlapping activations of one object and no acknowledged write lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster import history
from tests.cluster.netns import Network, available
from tests.pg import PostgresServer, find_binaries
from wsecho.serve.haproxy import Member, RouteKey, haproxy_config

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("h1", "h2", "h3")
ROOMS = [f"room{i}" for i in range(9)]
TTL = 3.0
#: Every room is served again within the ttl plus this (docs/scaling-out.md): a dead member's
#: heartbeat grace (half a ttl more), HAProxy's detection (two failed checks a second apart),
#: the clients' own timeouts (3 s) and retries, on a shared test machine.
BOUND = 15.0
PORT, ADMIN = 8787, 9787

pytestmark = pytest.mark.skipif(
    available() is not None or shutil.which("haproxy") is None,
    reason=available() or "haproxy is not installed (scripts/install-proxies)",
)


class NetnsPostgres(PostgresServer):
    """The session's kind of PostgreSQL server, inside host ``pg``'s namespace."""

    def __init__(self, base: Path, binaries: Path, net: Network) -> None:
        super().__init__(base, binaries)
        self.net = net
        self.port = 5432

    def _command(self, *args: str) -> list[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        return self.net.command("pg", ["runuser", "-u", "postgres", "--", *command])

    def _listen(self) -> str:
        return self.net.ip("pg")

    def start(self, timeout: float = 30) -> NetnsPostgres:
        hba = self.data / "pg_hba.conf"
        if self.net.subnet not in hba.read_text():
            with hba.open("a") as f:
                f.write(f"host all all {self.net.subnet} trust\n")
        super().start(timeout)
        return self

    def url(self, database: str = "postgres", schema: str | None = None) -> str:
        return f"postgresql://wsecho@{self.net.ip('pg')}:{self.port}/{database}"


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.net = Network(["pg", "lb", *HOSTS, "cl"])
        self.probe = tmp / "probe.log"
        self.history = tmp / "history.log"
        self.owners = tmp / "owners.map"
        self.owners.write_text("")
        self.hosts: dict[str, subprocess.Popen[bytes]] = {}
        self.driver: subprocess.Popen[bytes] | None = None
        self.logs: list[object] = []
        binaries = find_binaries()
        if binaries is None:
            pytest.fail("PostgreSQL is not installed: run scripts/install-postgres")
        base = Path(tempfile.mkdtemp(prefix="wsecho-pg-"))
        self.pg = NetnsPostgres(base, binaries, self.net)
        self.pg.init().start()
        members = [Member(h, self.net.ip(h), PORT, ADMIN) for h in HOSTS]
        config = tmp / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                members,
                bind=f"{self.net.ip('lb')}:80",
                route=RouteKey.parse("path:2"),
                runtime_api=f"ipv4@{self.net.ip('lb')}:9999",
                map_path=str(self.owners),
            )
        )
        self.haproxy = self.net.popen(
            "lb", ["haproxy", "-db", "-f", str(config)], stdout=self._log("haproxy"), stderr=subprocess.STDOUT
        )
        for host in HOSTS:
            self.start(host)

    def _log(self, name: str):
        f = (self.tmp / f"{name}.log").open("ab")
        self.logs.append(f)
        return f

    def start(self, host: str) -> None:
        ip = self.net.ip(host)
        command = [
            sys.executable, "-m", "wsecho", "tests.apps.workers_app",
            "--host", ip, "--port", str(PORT), "--admin-host", ip, "--admin-port", str(ADMIN),
            "--storage", self.pg.url(), "--member-name", host, "--lease-ttl", str(TTL),
            "--route-key", "path:2", "--haproxy-runtime", f"{self.net.ip('lb')}:9999",
            "--haproxy-map", str(self.owners), "--lb-probe-timeout", "3", "--drain-timeout", "1",
        ]  # fmt: skip
        self.hosts[host] = self.net.popen(
            host,
            command,
            cwd=ROOT,
            env={**os.environ, "WSECHO_TEST_PROBE_LOG": str(self.probe)},
            stdout=self._log(host),
            stderr=subprocess.STDOUT,
        )

    def ready(self, host: str) -> bool:
        done = subprocess.run(
            self.net.command("lb", ["curl", "-s", "-m", "1", f"http://{self.net.ip(host)}:{ADMIN}/readyz"]),
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() == "ready"

    def wait(self, check, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout}s: {what}")
            time.sleep(0.1)

    def acks_since(self, since: float) -> dict[str, float]:
        lines = self.history.read_text().splitlines() if self.history.exists() else []
        return history.recovery(history.acks(lines), since, ROOMS)

    def served_again(self, since: float, what: str) -> dict[str, float]:
        """Wait until every room was acknowledged after ``since``; fail past the bound."""
        try:
            self.wait(
                lambda: max(self.acks_since(since).values()) < float("inf"),
                f"every room served again after {what}",
                timeout=TTL + BOUND + 5,
            )
        except BaseException:
            self.explain()
            raise
        times = self.acks_since(since)
        assert max(times.values()) <= TTL + BOUND, f"{what}: rooms served again after {times}"
        return times

    def explain(self) -> None:
        """What the clients are doing (their stacks go to driver.log)."""
        driver = self.driver
        if driver is None:
            return
        if driver.poll() is not None:
            print(f"the client driver exited with status {driver.returncode}")
            return
        driver.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
        query = (
            "SELECT owner, count(*), sum((expires_at > now())::int) FROM wsecho_slots GROUP BY owner ORDER BY owner; "
            "SELECT client_addr, state, wait_event, now() - xact_start AS xact, now() - state_change AS since, "
            "left(query, 60) FROM pg_stat_activity WHERE datname = 'postgres' AND state <> 'idle'"
        )
        psql = ["psql", "-h", self.net.ip("pg"), "-U", "wsecho", "postgres", "-c", query]
        print(subprocess.run(self.net.command("pg", psql), capture_output=True, text=True, check=False).stdout)
        for host in HOSTS:
            url = f"http://{self.net.ip(host)}:{ADMIN}/readyz"
            curl = ["curl", "-s", "-m", "1", url]
            print(
                host, subprocess.run(self.net.command("lb", curl), capture_output=True, text=True, check=False).stdout
            )

    def close(self) -> None:
        self.history.with_suffix(".stop").touch()
        for process in self.hosts.values():
            if process.poll() is None:
                process.kill()
        self.net.close()
        self.pg.stop(mode="immediate")
        shutil.rmtree(self.pg.base, ignore_errors=True)
        for f in self.logs:
            f.close()  # type: ignore[attr-defined]


def test_no_two_activations_and_no_lost_write_through_every_fault(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.wait(lambda: all(cluster.ready(h) for h in HOSTS), "every host ready")
        driver = cluster.driver = cluster.net.popen(
            "cl",
            [sys.executable, "-m", "tests.cluster.driver", f"ws://{cluster.net.ip('lb')}:80", str(cluster.history), *ROOMS],
            cwd=ROOT,
            stdout=cluster._log("driver"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        start = time.monotonic()
        cluster.served_again(start, "the start")
        recoveries: dict[str, dict[str, float]] = {}

        # 1. SIGKILL one host; restart it.
        at = time.monotonic()
        cluster.hosts["h1"].send_signal(signal.SIGKILL)
        recoveries["SIGKILL"] = cluster.served_again(at, "SIGKILL of h1")
        cluster.start("h1")
        cluster.wait(lambda: cluster.ready("h1"), "h1 ready again")

        # 2. SIGSTOP past the lease, then SIGCONT: it must not act for what it lost.
        at = time.monotonic()
        cluster.hosts["h2"].send_signal(signal.SIGSTOP)
        recoveries["SIGSTOP"] = cluster.served_again(at, "SIGSTOP of h2")
        time.sleep(TTL)
        cluster.hosts["h2"].send_signal(signal.SIGCONT)
        cluster.wait(lambda: cluster.ready("h2"), "h2 ready again after SIGCONT")

        # 3. One host cut off from PostgreSQL.
        at = time.monotonic()
        cluster.net.cut("h3", "pg")
        recoveries["cut from PostgreSQL"] = cluster.served_again(at, "h3 cut off from PostgreSQL")
        cluster.net.heal("h3", "pg")
        cluster.wait(lambda: cluster.ready("h3"), "h3 ready again")

        # 4. One host cut off from HAProxy.
        at = time.monotonic()
        cluster.net.cut("h1", "lb")
        recoveries["cut from HAProxy"] = cluster.served_again(at, "h1 cut off from HAProxy")
        cluster.net.heal("h1", "lb")
        cluster.wait(lambda: cluster.ready("h1"), "h1 ready again")

        # 5. A rolling restart of all three.
        for host in HOSTS:
            at = time.monotonic()
            cluster.hosts[host].send_signal(signal.SIGTERM)
            assert cluster.hosts[host].wait(timeout=30) == 0
            cluster.start(host)
            cluster.wait(lambda host=host: cluster.ready(host), f"{host} ready after its restart")
            recoveries[f"restart of {host}"] = cluster.served_again(at, f"the restart of {host}")

        cluster.history.with_suffix(".stop").touch()
        driver.wait(timeout=30)
        probe_lines = cluster.probe.read_text().splitlines()
        history_lines = cluster.history.read_text().splitlines()
        assert history.overlaps(history.activations(probe_lines)) == []
        assert history.lost_writes(history.acks(history_lines)) == []
        worst = {fault: round(max(times.values()), 2) for fault, times in recoveries.items()}
        print("seconds until every room was served again:", worst)
    finally:
        cluster.close()
