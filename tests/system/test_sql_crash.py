"""SQL storage with a real server process: SIGKILL loses no acknowledged turn, and a turn's SQL
and key-value writes survive together or not at all."""

import asyncio
import contextlib
import os
import random
import signal
import sqlite3

import pytest

from tests.helpers import ServerProcess
from tests.system.test_crash import run_in_new_loop, write_until_cut


def stored(data_dir) -> tuple[set[int], list[tuple[int, int]]]:
    """The keys of every object's key-value table, and per object (its counter, its key count)."""
    keys: set[int] = set()
    pairs = []
    files = sorted((data_dir / "objects" / "COUNTER").glob("*.sqlite3"))
    assert files, "no object database was written"
    for path in files:
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            mine = set()
            if "_cf_KV" in tables:  # a kill before an object's first turn committed leaves none
                mine = {int(k[1:]) for (k,) in db.execute("SELECT key FROM _cf_KV WHERE key LIKE 'k%'")}
            row = None
            if "counters" in tables:
                row = db.execute("SELECT value FROM counters WHERE name = 'hits'").fetchone()
        finally:
            db.close()
        keys |= mine
        pairs.append((row[0] if row else 0, len(mine)))
    return keys, pairs


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_loses_no_acknowledged_sql_turn_and_splits_none(tmp_path, seed):
    data_dir = tmp_path / "data"
    rng = random.Random(seed)
    acked: set[int] = set()
    n = 0
    for _ in range(3):
        server = ServerProcess(["tests.apps.sql_app", "--port", "0", "--data-dir", str(data_dir)]).ready()
        try:

            async def run(port=server.port, first=n, pid=server.proc.pid):
                loop = asyncio.get_running_loop()
                delay = rng.uniform(0.05, 0.4)

                def kill_soon():
                    loop.call_later(delay, os.kill, pid, signal.SIGKILL)

                return await write_until_cut(port, first, acked, kill_soon)

            n = run_in_new_loop(run)
            assert server.proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            with contextlib.suppress(ProcessLookupError):
                server.stop()
        keys, pairs = stored(data_dir)
        assert acked, "the client got no acknowledgement before the kill"
        missing = acked - keys
        assert not missing, f"{len(missing)} acknowledged turns lost, e.g. {sorted(missing)[:5]}"
        # Each turn adds 1 to the counter and one key: a crash keeps both or neither.
        assert all(count == nkeys for count, nkeys in pairs), pairs
