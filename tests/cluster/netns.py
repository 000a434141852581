"""Several "hosts" on one machine: network namespaces joined by a bridge that lives in a
namespace of its own, with nftables inside a host's namespace for partitions.

Nothing here gives the root namespace an address on the test subnet: the bridge and every
address live inside namespaces, and a blackhole route for the subnet in the root namespace
makes sure that no packet for it can leave the machine. Every process started here is
stopped by its PID, and every namespace deleted, when the network is closed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Sequence

import pytest


def available() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-netns installs iproute2 and nftables)"
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


class Network:
    """Hosts ``names`` on 10.231.N.0/24 (N random), each in namespace ``<tag>-<name>``."""

    def __init__(self, names: Sequence[str]) -> None:
        why = available()
        if why is not None:
            pytest.skip(why)
        self.tag = f"ws{os.getpid() % 100000}"
        self.third = random.randrange(1, 250)
        self.subnet = f"10.231.{self.third}.0/24"
        self.addresses: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[str] = []
        try:
            sh("ip", "route", "add", "blackhole", self.subnet)
            self._namespace("sw")
            sh("ip", "-n", self.ns("sw"), "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.ns("sw"), "link", "set", "br0", "up")
            for i, name in enumerate(names, start=2):
                self._namespace(name)
                port = f"p{i}"
                sh(
                    "ip",
                    "-n",
                    self.ns("sw"),
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    self.ns(name),
                )
                sh("ip", "-n", self.ns("sw"), "link", "set", port, "master", "br0", "up")
                address = f"10.231.{self.third}.{i}"
                sh("ip", "-n", self.ns(name), "addr", "add", f"{address}/24", "dev", "eth0")
                sh("ip", "-n", self.ns(name), "link", "set", "eth0", "up")
                self.addresses[name] = address
        except BaseException:
            self.close()
            raise

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def _namespace(self, name: str) -> None:
        sh("ip", "netns", "add", self.ns(name))
        self.namespaces.append(self.ns(name))
        sh("ip", "-n", self.ns(name), "link", "set", "lo", "up")

    def ip(self, name: str) -> str:
        return self.addresses[name]

    def command(self, name: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside host ``name``'s namespace."""
        return ["ip", "netns", "exec", self.ns(name), *cmd]

    def popen(self, name: str, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.command(name, cmd), **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def run(self, name: str, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return sh(*self.command(name, cmd))

    def cut(self, name: str, peer: str) -> None:
        """Drop every packet between host ``name`` and host ``peer`` (both ways), in ``name``'s namespace."""
        table = f"cut_{peer}"
        rules = (
            f"add table inet {table}\n"
            f"add chain inet {table} out {{ type filter hook output priority 0 ; }}\n"
            f"add chain inet {table} in {{ type filter hook input priority 0 ; }}\n"
            f"add rule inet {table} out ip daddr {self.ip(peer)} drop\n"
            f"add rule inet {table} in ip saddr {self.ip(peer)} drop\n"
        )
        subprocess.run([*self.command(name, ["nft", "-f", "-"])], input=rules, text=True, check=True, timeout=30)

    def heal(self, name: str, peer: str) -> None:
        self.run(name, ["nft", "delete", "table", "inet", f"cut_{peer}"])

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for ns in reversed(self.namespaces):
            # Whatever still runs inside (a child of a child) goes with the namespace's processes.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        sh("ip", "route", "del", "blackhole", self.subnet, check=False)
