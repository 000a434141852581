"""CPU use over a measured window: the server's, the client's (this process), and what else ran on their CPUs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time

from benchkit.procs import CLIENT_CPU, PIN, SERVER_CPU


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
        def pct(v: float | None) -> str:
            return "?" if v is None else f"{v:.0f}%"

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
