"""A progress line on stderr while a run is long, only when stderr is a terminal.

The line is rewritten in place (``\\r`` ... erase to the end of the line). Anything
else written to that terminal — output lines on a stdout that is the same
terminal, a message on stderr — first erases it (``clear_line``): otherwise it
would start where the progress line ends ("... in flight0 {...").
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, TextIO

from orchestrator.wording import counted

ERASE = "\r\x1b[K"  # back to the line's start, erase to its end

# The progress line now on a terminal, if any (one run per process).
_shown: Progress | None = None


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
        global _shown
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last = now
        rate = events / max(now - self.started, 1e-9)
        lag = max(0, read_epoch - committed)
        self.stream.write(
            f"\r{counted(events, 'event')} read, committed through epoch {committed:,} "
            f"(lag {counted(lag, 'epoch')}), {rate:,.0f} events/s, "
            f"{counted(in_flight, 'batch', 'batches')} in flight\x1b[K"
        )
        self.stream.flush()
        self.shown = True
        _shown = self

    def erase(self) -> None:
        """Erase the line, if shown: the next thing written to the terminal starts clean."""
        global _shown
        if self.shown:
            self.stream.write(ERASE)
            self.stream.flush()
            self.shown = False
        if _shown is self:
            _shown = None

    def close(self) -> None:
        """End the progress line so that later messages start on a fresh line."""
        self.erase()


def clear_line(out: IO[Any] | None = None) -> None:
    """Erase the progress line before writing to ``out`` (default: the progress line's own
    stream), if ``out`` is the terminal it is shown on."""
    if _shown is None:
        return
    if out is None or out is _shown.stream or same_terminal(out, _shown.stream):
        _shown.erase()


def same_terminal(a: IO[Any], b: IO[Any]) -> bool:
    """Whether two streams write to the same terminal device."""
    try:
        fa, fb = a.fileno(), b.fileno()
        if not (os.isatty(fa) and os.isatty(fb)):
            return False
        sa, sb = os.fstat(fa), os.fstat(fb)
    except (OSError, ValueError, AttributeError):
        # (a stream without a file descriptor, such as a test's buffer, is no terminal)
        return False
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)
