"""The one exception of the benchmark: something went wrong, and the run fails (exit status 1)."""


class BenchError(Exception):
    """Something went wrong: a wrong echo, a dropped connection, a server that died."""
