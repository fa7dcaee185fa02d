"""A progress line on stderr while a run is long, only when stderr is a terminal.

The line is rewritten in place (``\\r`` ... erase to the end of the line). Anything
else written to that terminal — output lines on a stdout that is the same
terminal, a message on stderr — first erases it (``clear_line``): otherwise it
would start where the progress line ends ("... in flight0 {...").
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections import deque
from typing import IO, Any, TextIO

from orchestrator.wording import counted

ERASE = "\r\x1b[K"  # back to the line's start, erase to its end

# The progress line now on a terminal, if any (one run per process).
_shown: Progress | None = None


class Progress:
    """Rewrites one stderr line at most a few times a second; silent when not a terminal.

    For a file read to its end: the share of its bytes committed, the committed rate
    and the time left at that rate. For live input (followed, a pipe): the committed
    rate and the lag (events read and not yet committed). Rates count committed
    events, not lines read, over the last WINDOW seconds.
    """

    INTERVAL = 0.5
    WINDOW = 10.0

    def __init__(self, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.last = 0.0
        self.shown = False
        self.total: int | None = None  # bytes of a file read to its end; None: live input
        # (time, committed events, committed byte offset), the oldest at most WINDOW s old
        self.samples: deque[tuple[float, int, int]] = deque([(time.monotonic(), 0, 0)])

    def start(self, offset: int, total: int | None) -> None:
        """The run starts at byte ``offset`` of an input of ``total`` bytes (None: live)."""
        self.total = total
        self.samples = deque([(time.monotonic(), 0, offset)])

    def update(
        self,
        *,
        read: int,
        committed: int,
        committed_epoch: int,
        committed_offset: int,
        in_flight: int,
    ) -> None:
        """Show the current figures if the last update is old enough: events ``read`` and
        ``committed`` in this run, the committed epoch and the byte offset after it."""
        global _shown
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.INTERVAL:
            return
        self.last = now
        rate, byte_rate = self._rates(now, committed, committed_offset)
        batches = f"{counted(in_flight, 'batch', 'batches')} in flight"
        through = f"through epoch {committed_epoch:,}" if committed_epoch >= 0 else "no epoch yet"
        if self.total is None:
            lag = counted(max(0, read - committed), "event")
            text = f"committed {through}, {rate:,.0f} events/s, lag {lag}, {batches}"
        else:
            left = max(0, self.total - committed_offset)
            share = 100.0 * (1 - left / self.total) if self.total else 100.0
            eta = clock(left / byte_rate) if byte_rate > 0 else "--:--:--"
            text = f"{share:.1f}% committed ({through}), {rate:,.0f} events/s, ETA {eta}, {batches}"
        self.stream.write(f"\r{text[: self._width()]}\x1b[K")
        self.stream.flush()
        self.shown = True
        _shown = self

    def _width(self) -> int | None:
        """The terminal's width less one: a line that wrapped could not be rewritten in place
        (``\\r`` goes back to the start of its last row only)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return None
        return columns - 1 if columns > 1 else None  # (0: a terminal that did not say)

    def _rates(self, now: float, committed: int, offset: int) -> tuple[float, float]:
        """Committed events and bytes per second over the last WINDOW seconds."""
        self.samples.append((now, committed, offset))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
            self.samples.popleft()
        then, events, start = self.samples[0]
        elapsed = now - then
        if elapsed < self.INTERVAL:  # too short to say
            return 0.0, 0.0
        return max(0, committed - events) / elapsed, max(0, offset - start) / elapsed

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


def clock(seconds: float) -> str:
    """A duration as ``H:MM:SS``."""
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def input_size(f: Any, follow: bool) -> int | None:
    """The size of an input that is read to its end (a regular file, not followed); None for
    live input (followed, a pipe), whose end is not known."""
    if follow:
        return None
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


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
