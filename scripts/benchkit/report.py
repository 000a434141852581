"""What the benchmark prints: one :class:`Line` per target, progress details, and the number formats."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable

from benchkit.interrupt import check_interrupted


@dataclasses.dataclass
class Line:
    """One target: ``metric: value (baseline value) ratio [target, met|NOT MET]``."""

    metric: str
    value: str
    baseline: str
    ratio: float | None
    target: str
    met: bool

    def render(self) -> str:
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        verdict = "met" if self.met else "NOT MET"
        return f"{self.metric}: {self.value} ({self.baseline}) {ratio} [{self.target}, {verdict}]"


def med(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def detail(text: str) -> None:
    print(f"  {text}", flush=True)
    check_interrupted()
