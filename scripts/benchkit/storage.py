"""Storage turns per second on PostgreSQL against SQLite: each turn a ``put`` and a reply.

``python -m wsecho benchapps:storage_app`` gives each connection an object that stores every
message before echoing it, so the output gate holds each reply until its write is committed:
a figure of commits (group commit shares them among the objects that wrote meanwhile). The
same server runs with ``--data-dir`` (SQLite, ``synchronous=FULL``) and with ``--storage
postgresql://...``, alternating. PostgreSQL is a server of the benchmark's own (the tests'
tests/pg.py: initdb in a temporary directory, ``fsync=on``), not pinned.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from benchkit.config import Config
from benchkit.echo import one_load_run
from benchkit.errors import BenchError
from benchkit.load import describe
from benchkit.report import Line, detail, fmt_rate, med

#: Connections (one object each) and message size of the figure.
CONNECTIONS = 100
SIZE = 32


async def bench_storage(cfg: Config) -> list[Line]:
    from tests.pg import INSTALL_HINT, PostgresServer, find_binaries  # the repository root is on sys.path

    binaries = find_binaries()
    if binaries is None:
        raise BenchError(INSTALL_HINT)
    base = Path(tempfile.mkdtemp(prefix="wsecho-bench-pg-"))
    postgres = PostgresServer(base, binaries)
    sqlite: list[float] = []
    pg: list[float] = []
    try:
        postgres.init().start()
        for r in range(cfg.rounds):
            for label, flags, out in (
                ("sqlite", ("--data-dir", str(cfg.tmp / f"storage-{r}")), sqlite),
                ("postgres", ("--storage", postgres.fresh_url()), pg),
            ):
                t = await one_load_run(cfg, "storage", CONNECTIONS, SIZE, flags=flags)
                out.append(t.msgs_per_s)
                detail(f"[storage_turns run {r + 1}] {label}: {describe(t)}")
    finally:
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
    s, p = med(sqlite), med(pg)
    ratio = p / s
    return [
        Line(
            f"storage_turns_{CONNECTIONS}_objects",
            f"postgres {fmt_rate(p)} turns/s",
            f"sqlite {fmt_rate(s)} turns/s",
            ratio,
            "recorded, no target",
            True,
        )
    ]
