"""How an error ends a command: one line on stderr and an exit status (a traceback only
with --verbose, or for a bug)."""

from __future__ import annotations

import os
import traceback

from orchestrator.errors import OutputError, ServerStopped
from orchestrator.messages import say
from orchestrator.server import outage_note
from tasks.errors import ExitStatus, PipelineError


def report_error(e: Exception, verbose: bool, resume: str | None = None) -> int:
    """Say the one-line message of an expected error and return its exit status; others
    propagate.

    ``resume`` is the command that continues the run, for errors that a fixed disk cures.
    """
    import redis

    known = failure(e, resume)
    if known is None:
        raise e
    status, message = known
    # A lost connection says all there is; the other errors' tracebacks help with --verbose.
    if verbose and not isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        traceback.print_exc()
    say(message)
    return status


def failure(e: BaseException, resume: str | None = None) -> tuple[int, str] | None:
    """The exit status and one-line message of an error: the one mapping from failures to
    exit statuses (None for a bug, which keeps its traceback)."""
    import redis

    if isinstance(e, KeyboardInterrupt):
        kept = f"; committed epochs are kept: '{resume}' continues" if resume else ""
        return int(ExitStatus.INTERRUPTED), f"interrupted{kept}"
    if isinstance(e, BrokenPipeError):
        return int(ExitStatus.OUTPUT_CLOSED), "the reader of standard output went away"
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        lost = f"lost the connection to Redis{outage_note()}: {e}"
        return int(ExitStatus.REDIS_UNAVAILABLE), lost
    if isinstance(e, redis.ResponseError) and "MISCONF" in str(e):
        # The server refuses writes because it cannot persist them (a full or failing disk).
        # (Inside a pipeline's error the reply comes after "Command # N (...) of pipeline".)
        reply = str(e)[str(e).index("MISCONF") :]
        then = f", then run '{resume}'" if resume else ""
        return int(ExitStatus.REDIS_UNAVAILABLE), (
            f"the Redis server cannot write to its disk, so it refuses writes: {reply}{then}"
        )
    if isinstance(e, redis.RedisError):
        return int(ExitStatus.REDIS_UNAVAILABLE), f"Redis refused a command: {e}"
    if isinstance(e, PipelineError):
        return int(e.exit_status), str(e) + disk_advice(e, resume)
    if isinstance(e, OSError) and e.filename is not None:
        # A file the command needs (besides the input, the output and the data directory,
        # which have their own messages): a read-only or full disk, permissions.
        return int(ExitStatus.NO_INPUT), f"cannot use {os.fsdecode(e.filename)}: {e.strerror}"
    return None


def disk_advice(e: PipelineError, resume: str | None) -> str:
    """What to do after a full disk: free space, then resume (which gives the exact result)."""
    if resume is None:
        return ""
    if isinstance(e, ServerStopped):
        if not e.disk:
            return f"; run '{resume}' to continue"
        free = "free space there" if e.no_space else "fix its disk"
        return f"; {free}, then run '{resume}'"
    if isinstance(e, OutputError) and e.disk_error:
        cut = " (it cuts the file back to the committed epochs first)" if e.path else ""
        return f"; free space (or fix the disk), then run '{resume}'{cut}"
    return ""
