"""CPU use over a measured window: the server's, the client's (this process), and what else ran on their CPUs.

:class:`CpuMeter` is for a server pinned to its CPU, :class:`SpreadCpuMeter` for a server of
several processes (``--workers``) that, like the client, may run on every CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time

from benchkit.procs import ALL_CPUS, CLIENT_CPU, PIN, SERVER_CPU


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per CPU from /proc/stat: (user + nice + system + steal, irq + softirq) seconds."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals[:8]]
                out[int(name[3:])] = ((v[0] + v[1] + v[2] + v[7]) / tick, (v[5] + v[6]) / tick)
    return out


def pct(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}%"


@dataclasses.dataclass
class CpuUse:
    """CPU use over a measured window, in % of one CPU."""

    server: float | None
    client: float
    #: What else ran on the server's and the client's CPU: other processes (other tenants,
    #: other tests), steal; and interrupts (on loopback, mostly our own packets' softirq work).
    others: tuple[float | None, float | None]
    irq: tuple[float | None, float | None]

    def __str__(self) -> str:
        text = f"server CPU {pct(self.server)}, client CPU {pct(self.client)}"
        if PIN:
            text += (
                f", CPU {SERVER_CPU}/{CLIENT_CPU}: others {pct(self.others[0])}/{pct(self.others[1])}"
                f" irq {pct(self.irq[0])}/{pct(self.irq[1])}"
            )
        return text


class CpuMeter:
    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.t0 = time.perf_counter()
        self.own0 = self_cpu_seconds()
        self.server0 = proc_cpu_seconds(server_pid)
        self.cpus0 = cpu_times()

    def stop(self) -> CpuUse:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        own = 100 * (self_cpu_seconds() - self.own0) / elapsed
        server1, cpus1 = proc_cpu_seconds(self.pid), cpu_times()
        server = None if self.server0 is None or server1 is None else 100 * (server1 - self.server0) / elapsed

        def delta(cpu: int, which: int) -> float | None:
            if cpu not in cpus1 or cpu not in self.cpus0:
                return None
            return 100 * (cpus1[cpu][which] - self.cpus0[cpu][which]) / elapsed

        def other(cpu: int, ours: float | None) -> float | None:
            busy = delta(cpu, 0)
            return None if busy is None or ours is None else max(0.0, busy - ours)

        return CpuUse(
            server,
            own,
            (other(SERVER_CPU, server), other(CLIENT_CPU, own)),
            (delta(SERVER_CPU, 1), delta(CLIENT_CPU, 1)),
        )


@dataclasses.dataclass
class SpreadCpuUse:
    """CPU use over a measured window of a server's processes and of the client, in % of one CPU,
    and what else ran on the CPUs they share."""

    #: Each of the server's processes by name: "supervisor", "worker PID".
    parts: dict[str, float | None]
    client: float
    #: Every shared CPU's busy time less the server's and the client's: other processes, steal.
    others: float | None
    irq: float | None

    @property
    def server(self) -> float | None:
        values = list(self.parts.values())
        return None if None in values else sum(v for v in values if v is not None)

    def __str__(self) -> str:
        each = ", ".join(f"{name} {pct(v)}" for name, v in self.parts.items())
        return (
            f"server CPU {pct(self.server)} ({each}), client CPU {pct(self.client)}, "
            f"others {pct(self.others)}, irq {pct(self.irq)} (of {100 * len(ALL_CPUS)}%)"
        )


class SpreadCpuMeter:
    def __init__(self, parts: dict[str, int]) -> None:
        self.parts = parts
        self.t0 = time.perf_counter()
        self.own0 = self_cpu_seconds()
        self.cpu0 = {name: proc_cpu_seconds(pid) for name, pid in parts.items()}
        self.cpus0 = cpu_times()

    def stop(self) -> SpreadCpuUse:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        own = 100 * (self_cpu_seconds() - self.own0) / elapsed
        parts: dict[str, float | None] = {}
        for name, pid in self.parts.items():
            before, after = self.cpu0[name], proc_cpu_seconds(pid)
            parts[name] = None if before is None or after is None else 100 * (after - before) / elapsed
        cpus1 = cpu_times()
        shared = [c for c in ALL_CPUS if c in cpus1 and c in self.cpus0]

        def total(which: int) -> float | None:
            if not shared:
                return None
            return 100 * sum(cpus1[c][which] - self.cpus0[c][which] for c in shared) / elapsed

        use = SpreadCpuUse(parts, own, None, total(1))
        busy, server = total(0), use.server
        if busy is not None and server is not None:
            use.others = max(0.0, busy - server - own)
        return use
