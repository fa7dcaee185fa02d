"""Ctrl-C and SIGTERM in a command: a ``KeyboardInterrupt``, held back while the driver writes
committed lines and records them.

Raised in the middle of that, the interrupt left the namespace's record where it was
(the driver cannot know whether a record it was sending landed, so it sends none): the
lines written since the last record counted as uncommitted, and ``status`` showed the
run behind what it had written. Held back, the write and its record (one script call)
complete and the interrupt is raised right after them; the interrupted run then records
everything it wrote.
"""

from __future__ import annotations

import signal
from types import TracebackType


class _Held:
    depth = 0  # sections being run (they may nest)
    pending = False  # an interrupt came during one: raise it at the end of the outermost


HELD = _Held()


def install() -> None:
    """Make Ctrl-C and SIGTERM interrupt this process (once), outside held sections."""
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stop as an interrupted run, once.

    The command then stops its workers, releases the namespace and leaves the
    embedded server: a second Ctrl-C during that would only cut it short (the
    next command would wait for the driver lock to expire), so it is ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if HELD.depth:
        HELD.pending = True
        from orchestrator.server import AnnouncedRetry  # (imported already: a run holds it)

        # A record that waits for a lost Redis fails now instead of after its 30 s of retries:
        # the interrupt stops the process at once, as outside the section.
        AnnouncedRetry.give_up = True
        return
    raise KeyboardInterrupt


class held_interrupts:  # noqa: N801 - used as a statement: ``with held_interrupts():``
    """A section that an interrupt does not cut: it is raised when the section ends.

    If the section fails because of the interrupt (a lost Redis no longer retried),
    the interrupt is raised instead of that error; any other error goes on as it is.
    """

    def __enter__(self) -> None:
        HELD.depth += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        HELD.depth -= 1
        if HELD.depth or not HELD.pending:
            return
        if error is not None and not _cut_by_interrupt(error):
            return
        HELD.pending = False
        raise KeyboardInterrupt from error


def _cut_by_interrupt(error: BaseException) -> bool:
    import redis  # (a held section runs in a command that uses Redis: imported already)

    return isinstance(error, KeyboardInterrupt | redis.ConnectionError | redis.TimeoutError)
