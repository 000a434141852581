"""The package behind ``scripts/bench``: wsecho against bare Tornado, every figure a ratio.

One module per concern; each imports only modules listed before it here:

- ``errors``: :class:`~benchkit.errors.BenchError`, the one way a run fails; ``interrupt``: the
  SIGINT/SIGTERM flag and the bounded polling wait that checks it.
- ``procs``: the processes started (CPU pinning, file limit, stopped by PID), ``/proc`` reads;
  ``cpu``: CPU use over a window; ``servers``: the servers under test, started and stopped.
- ``client``: the picows load client that checks every echo.
- ``report``: the printed lines and number formats; ``config``: full or ``--quick`` sizes.
- ``load``: one timed load run (throughput, latency, CPU).
- The measurement families: ``echo``, ``wake``, ``memory``, ``handshakes``, ``fairness``,
  ``sweep`` (which runs ``sweepchild`` in a child process), ``workers`` (``--workers 2``
  against ``--workers 1``).
- ``cli``: the command line (``--quick``, ``--only``, ``--duration``, ``--strict``) and the run.

It imports wsecho only through public entry points (``wsecho``, ``wsecho.runtime``,
``wsecho.examples``, ``python -m wsecho``), in the servers and the sweep child.
"""
