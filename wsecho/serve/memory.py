"""Memory-pressure eviction's I/O: reads how much memory the server uses, and gives freed memory
back to the system after a large eviction (docs/decisions/0010).

The reading is the cgroup v2 usage when the process's cgroup has a ``memory.max`` (a container,
a systemd unit with ``MemoryMax=``): ``memory.current`` less ``inactive_file`` from
``memory.stat``, the page cache the kernel reclaims before it kills anyone (what the kubelet calls
the working set). Otherwise it is the process's resident set (``/proc/self/statm``), and a
percentage mark is a percentage of the machine's memory (``MemTotal``). How many objects to
hibernate is :class:`~wsecho.core.memory.PressurePolicy`'s answer; this module only measures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wsecho.core.errors import ConfigError
from wsecho.core.memory import Mark, MemoryReading, PressurePolicy
from wsecho.core.wording import counted

if TYPE_CHECKING:
    from wsecho.runtime.runtime import Runtime

log = logging.getLogger(__name__)

#: Where cgroup v2 is mounted, and where a process finds its own cgroup.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
#: Seconds between two readings (the sweep runs more often; reading /proc is not free).
CHECK_INTERVAL = 1.0
#: At most one log line per this many seconds about evictions for memory.
LOG_INTERVAL = 60.0
#: Evictions after which freed memory is handed back to the system (gc, then malloc_trim).
TRIM_AFTER = 50


def own_cgroup(proc: Path = PROC, root: Path = CGROUP_ROOT) -> Path | None:
    """The directory of this process's cgroup v2 (the ``0::`` line of /proc/self/cgroup), if any."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = root / line[3:].lstrip("/")
            return path if (path / "memory.current").exists() else None
    return None


class MemoryReader:
    """Reads the server's memory use: its cgroup's (``cgroup``, a directory; None: the RSS).

    ``share``: how many processes share the machine's memory (``--workers N``): measured by
    its RSS, each worker's percentage marks are of its share of the machine's memory (the
    cgroup's reading is already all of them together)."""

    def __init__(self, cgroup: Path | None, proc: Path = PROC, *, share: int = 1) -> None:
        self.cgroup = cgroup
        self._proc = proc
        self._page = os.sysconf("SC_PAGE_SIZE")
        total = _mem_total(proc)
        self._total = None if total is None else total // max(share, 1)

    def read(self) -> MemoryReading | None:
        """The current reading; None when nothing can be read (not Linux)."""
        if self.cgroup is not None:
            reading = self._cgroup_reading(self.cgroup)
            if reading is not None:
                return reading
        try:
            resident = int((self._proc / "self" / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        return MemoryReading(resident * self._page, self._total, "rss")

    @staticmethod
    def _cgroup_reading(cgroup: Path) -> MemoryReading | None:
        """The cgroup's working set and limit; None without a limit (``max``) or when unreadable."""
        try:
            limit = (cgroup / "memory.max").read_text().strip()
            if not limit.isdigit():
                return None
            current = int((cgroup / "memory.current").read_text())
        except (OSError, ValueError):
            return None
        cache = 0
        try:
            for line in (cgroup / "memory.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "inactive_file":
                    cache = int(value)
                    break
        except (OSError, ValueError):
            pass  # no memory.stat: count the cache as used, which only evicts earlier
        return MemoryReading(max(current - cache, 0), int(limit), "cgroup")


def _mem_total(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, which returns the heap's free pages; None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryGuard:
    """Checks the memory from the sweep, at most every ``interval`` seconds. Above the high-water
    mark it hibernates idle objects (least recently used first) and caps the objects in memory
    at what is left, until the memory is back under the low-water mark."""

    def __init__(
        self,
        runtime: Runtime,
        reader: MemoryReader,
        policy: PressurePolicy,
        *,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.runtime = runtime
        self.reader = reader
        self.policy = policy
        self.interval = interval
        #: The last reading (None before the first, or when nothing can be read).
        self.reading = reader.read()
        if self.reading is not None:
            policy.baseline = self.reading.used
        self._next = -float("inf")
        self._logged_at = -LOG_INTERVAL
        self._trim = _malloc_trim()

    def marks(self) -> tuple[int | None, int | None]:
        """The high- and low-water marks in bytes for the last reading (None: off)."""
        if self.reading is None:
            return None, None
        return self.policy.marks(self.reading)

    def check(self, now: float) -> int:
        """Read the memory if ``interval`` has passed; hibernate what the policy says. How many."""
        if now < self._next:
            return 0
        self._next = now + self.interval
        reading = self.reading = self.reader.read()
        if reading is None:
            return 0
        runtime = self.runtime
        _high, low = self.policy.marks(reading)
        if runtime.memory_cap is not None and (low is None or reading.used <= low):
            runtime.cap_active(None)  # memory is back under the low-water mark
        wanted = self.policy.to_evict(reading, runtime.active_count())
        if not wanted:
            return 0
        evicted = runtime.evict_lru(wanted, "memory")
        # Freed memory is reused before the reading falls: hold the objects in memory where
        # they are now, or the next wakes grow it again before the next reading.
        runtime.cap_active(runtime.active_count())
        if evicted >= TRIM_AFTER:
            self.release()
        if now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            high, low = self.marks()
            log.warning(
                "memory %d bytes (%s) is over the high-water mark of %s bytes: hibernated %s of %s "
                "wanted to reach %s bytes; at most %s stay in memory until it is under that",
                reading.used,
                reading.source,
                high,
                counted(evicted, "idle object"),
                wanted,
                low,
                counted(self.runtime.active_count(), "object"),
            )
        return evicted

    def release(self) -> None:
        """Give the memory of hibernated objects back: collect their cycles, then trim the heap."""
        gc.collect()
        if self._trim is not None:
            self._trim()


def memory_guard(
    runtime: Runtime, high: Mark | None, low: Mark | None, where: str = "auto", *, share: int = 1
) -> MemoryGuard | None:
    """The guard that ``--memory-high``, ``--memory-low`` and ``--memory-cgroup`` (``where``)
    ask for (None: off); ``share``: the processes that share the machine (``--workers``)."""
    if high is None:
        return None
    if where == "auto":
        cgroup = own_cgroup()
    elif where == "off":
        cgroup = None
    else:
        cgroup = Path(where)
        if not (cgroup / "memory.current").is_file():
            msg = f"{where} has no memory.current: not a cgroup v2 directory (auto finds the process's own)"
            raise ConfigError("--memory-cgroup", msg)
    return MemoryGuard(runtime, MemoryReader(cgroup, share=share), PressurePolicy(high, low))
