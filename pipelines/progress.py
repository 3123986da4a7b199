"""Progress of a step while its shards finish: rows/s and ETA on stdout, whichever way the shards run
(`pipelines.runner.run_shards` on a Ray Data actor pool, `pipelines.runner.run_tasks` as Ray tasks)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Prints rows/s and ETA while shards finish (at most every `every` seconds)."""

    step: str
    total_shards: int
    every: float = 5.0
    done_shards: int = 0
    rows: int = 0
    start: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def update(self, rows: int, force: bool = False) -> None:
        self.done_shards += 1
        self.rows += rows
        now = time.monotonic()
        if force or now - self._last >= self.every or self.done_shards == self.total_shards:
            self._last = now
            elapsed = max(now - self.start, 1e-6)
            rate = self.rows / elapsed
            left = self.total_shards - self.done_shards
            eta = elapsed / self.done_shards * left if self.done_shards else float("nan")
            print(
                f"[{self.step}] {self.done_shards}/{self.total_shards} shards, {self.rows} rows, "
                f"{rate:.1f} rows/s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s",
                flush=True,
            )


def track(step: str, total_shards: int, finished: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consume the stats of shards as they finish (in any order), printing `Progress`; return them in shard
    order."""
    progress = Progress(step, total_shards)
    results = []
    for stats in finished:
        results.append(stats)
        progress.update(stats["rows_in"])
    return sorted(results, key=lambda s: s["shard"])
