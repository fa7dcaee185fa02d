"""Timing the phases of one process's work, for ``bench.worker`` and ``bench.driver``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Phases:
    """Each phase's best time of a few runs; printed as microseconds per event."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.rows: list[tuple[str, float]] = []

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` ``runs`` times; keep the shortest time; return its last result."""
        best, result = float("inf"), None
        for _ in range(self.runs):
            started = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - started)
        self.rows.append((name, best))
        return result

    def print(self, events: int) -> None:
        """One line per phase and the total, in microseconds per event of ``events``."""
        width = max(len(name) for name, _ in self.rows)
        for name, seconds in self.rows:
            print(f"{name:<{width}}  {seconds / events * 1e6:6.2f} us/event")
        total = sum(seconds for _, seconds in self.rows)
        print(f"{'total':<{width}}  {total / events * 1e6:6.2f} us/event")
