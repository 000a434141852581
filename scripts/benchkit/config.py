"""How long and how large each measurement is (full or ``--quick``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class Config:
    rounds: int
    warmup: float
    duration: float
    memory_sizes: tuple[int, ...]
    handshakes: int
    handshake_concurrency: int
    sweep_objects: int
    sweep_small: int
    sweep_repeats: int
    tmp: Path

    @classmethod
    def make(cls, *, quick: bool, duration: float | None, tmp: Path) -> Config:
        """The full run's sizes, or ``--quick``'s; ``duration`` (``--duration``) overrides the default."""
        return cls(
            rounds=1 if quick else 3,
            warmup=0.3 if quick else 1.0,
            duration=duration if duration is not None else (1.0 if quick else 3.0),
            memory_sizes=(2000, 3800) if quick else (10_000, 19_000),
            handshakes=500 if quick else 2000,
            handshake_concurrency=50,
            sweep_objects=10_000 if quick else 100_000,
            sweep_small=100,
            sweep_repeats=100 if quick else 300,
            tmp=tmp,
        )
