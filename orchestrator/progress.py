"""A progress line on stderr while a run is long, only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Rewrites one stderr line at most a few times a second; silent when not a terminal."""

    INTERVAL = 0.5

    def __init__(self, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self.shown = False

    def update(self, events: int, committed: int, read_epoch: int, in_flight: int) -> None:
        """Show the current figures if the last update is old enough."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last = now
        rate = events / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r{events:,} events read, committed through epoch {committed:,} "
            f"(lag {max(0, read_epoch - committed):,} epochs), {rate:,.0f} events/s, "
            f"{in_flight} batches in flight\x1b[K"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """End the progress line so that later messages start on a fresh line."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
