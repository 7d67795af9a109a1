"""Where a generation's time goes: wall and CPU seconds per stage (bench/bench_variants.py
prints them per photo). CPU is the process's (every thread, encoder threads included), so a
stage's CPU is exact only when stages do not overlap: profile with one thread."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimes:
    """Seconds per stage name, summed over every time the stage ran."""

    def __init__(self) -> None:
        self.wall: defaultdict[str, float] = defaultdict(float)
        self.cpu: defaultdict[str, float] = defaultdict(float)

    def as_dict(self, digits: int = 4) -> dict[str, dict[str, float]]:
        return {name: {"wall": round(self.wall[name], digits), "cpu": round(self.cpu[name], digits)} for name in self.wall}


@contextmanager
def timed(stages: StageTimes | None, name: str) -> Iterator[None]:
    """Add the block's wall and CPU time to ``stages[name]`` (nothing when stages is None)."""
    if stages is None:
        yield
        return
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        stages.wall[name] += time.perf_counter() - wall
        stages.cpu[name] += time.process_time() - cpu
