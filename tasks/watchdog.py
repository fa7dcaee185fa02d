"""Stopping a flow that hangs on one event (``--batch-timeout``), in an RQ worker.

Two mechanisms, both armed only while a batch's events run through the flow:

- A SIGALRM interval timer ticks a few times per timeout. Each tick looks at
  how far the batch has got (the number of events left, read from the event
  iterator: nothing is counted per event); when the same event has been
  running for the timeout, the tick raises ``FlowTimeout`` in the flow. It is
  a ``BaseException``, so a flow's ``except Exception`` does not swallow it,
  and ``apply_events`` rejects that one event. Python runs signal handlers
  between bytecodes and also from C loops that check for signals, so this stops
  a pure-Python loop as well as a catastrophic regular expression (measured on
  Python 3.11: ``re.match(r"(a+)+$", "a" * 40 + "b")`` is interrupted at the
  next tick). A tick also renews the partition's lease when the lease thread is
  late: a hang that holds the GIL starves that thread, and the driver would send
  the batch to a second worker.
- ``faulthandler.dump_traceback_later`` runs a C thread that needs no GIL: when
  no event has finished for the timeout plus ``GRACE`` seconds (a flow that
  swallows ``BaseException``, C code that never checks for signals), it ends the
  process (status 1). The driver then sends the batch again, carefully (see
  ``tasks/careful.py``).

The score is per event, not per batch: a batch may hold 20,000 events, and a
flow that takes 5 ms an event is slow, not hung.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType, TracebackType
from typing import Any

GRACE = 5.0  # seconds past the timeout before the backstop ends the process
MAX_TICK = 0.5  # seconds between two ticks at most (a tick may renew the lease)
MIN_TICK = 0.02


class FlowTimeout(BaseException):  # noqa: N818 - it is raised inside the flow, like KeyboardInterrupt
    """Raised inside the flow when one event has run longer than the timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the flow ran longer than {seconds:g} s on one event")
        self.seconds = seconds


class EventWatch:
    """Watch one batch's events run through the flow (a context manager; see the module).

    ``on_tick`` runs at every tick that interrupts the flow, ``on_timeout`` just
    before a tick raises ``FlowTimeout`` (so a careful re-run can say that the
    flow timed out, in case it swallows the exception and the backstop ends it).

    ``position`` says how far the batch is (any number that changes with every
    event, such as the events left); ``caller`` is the code object of the
    function that calls the flow: a tick raises only when that function is not
    the one running itself (so never between two events), and never while code
    in ``shielded`` (our own Redis calls between events) runs.
    """

    def __init__(
        self,
        timeout: float,
        *,
        on_tick: Callable[[], None] | None = None,
        on_timeout: Callable[[], None] | None = None,
        shielded: tuple[CodeType, ...] = (),
    ) -> None:
        self.timeout = timeout
        self.on_tick = on_tick
        self.on_timeout = on_timeout
        self.shielded = shielded
        self.tick = min(MAX_TICK, max(MIN_TICK, timeout / 10))
        self.position: Callable[[], int] = lambda: 0
        self.caller: CodeType | None = None
        self._seen: int | None = None
        self._since = 0.0
        self._armed = False
        self._old_handler: Any = None
        self._old_timer: tuple[float, float] = (0.0, 0.0)

    def follow(
        self, position: Callable[[], int], caller: CodeType, helpers: tuple[CodeType, ...] = ()
    ) -> None:
        """Start watching: ``position()`` changes with every event; ``caller`` calls the flow.

        ``helpers`` are functions ``caller`` calls outside the flow (while it
        records a rejection, say): never interrupted either.
        """
        self.position, self.caller = position, caller
        self.shielded = (*self.shielded, *helpers)
        self._seen, self._since = position(), time.monotonic()

    def __enter__(self) -> EventWatch:
        if self.timeout <= 0:
            return self
        self._since = time.monotonic()
        self._arm_backstop()
        # Signals can only be handled in the main thread; elsewhere the backstop alone acts.
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
            # RQ's own job timeout uses this timer too: its jobs are sent with no timeout
            # (-1, see orchestrator/dispatch.py), and whatever was set is put back after.
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, self.tick, self.tick)
            self._armed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.timeout <= 0:
            return
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, *self._old_timer)
            signal.signal(signal.SIGALRM, self._old_handler)
            self._armed = False
        faulthandler.cancel_dump_traceback_later()

    def _arm_backstop(self) -> None:
        # The dump goes to stderr only with debug logs: a user sees the driver's one line.
        debug = logging.getLogger("tasks").isEnabledFor(logging.DEBUG)  # -v
        out = _stderr_fd() if debug else _devnull()
        faulthandler.dump_traceback_later(self.timeout + GRACE, exit=True, file=out)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        in_flow = self._in_flow(frame)
        if in_flow and self.on_tick is not None:
            self.on_tick()
        now = time.monotonic()
        position = self.position()
        if position != self._seen:
            self._seen, self._since = position, now
            self._arm_backstop()  # an event finished: the backstop counts from here
            return
        if in_flow and now - self._since >= self.timeout:
            self._since = now  # a flow that swallows it gets it again one timeout later
            if self.on_timeout is not None:
                self.on_timeout()
            raise FlowTimeout(self.timeout)

    def _in_flow(self, frame: FrameType | None) -> bool:
        """Whether the interrupted code is the flow's: called by ``caller``, not ours."""
        f = frame
        while f is not None:
            if f.f_code is self.caller:
                return f is not frame
            if f.f_code in self.shielded:
                return False
            f = f.f_back
        return False


_devnull_fd: int | None = None


def _devnull() -> int:
    global _devnull_fd  # noqa: PLW0603 - one descriptor per process, opened when first needed
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_WRONLY)
    return _devnull_fd


def _stderr_fd() -> int:
    return 2
