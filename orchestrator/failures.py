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
    """The one-line message and exit status of an expected error; others propagate.

    ``resume`` is the command that continues the run, for errors that a fixed disk cures.
    """
    import redis

    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        say(f"lost the connection to Redis{outage_note()}: {e}")
        return int(ExitStatus.REDIS_UNAVAILABLE)
    if isinstance(e, redis.ResponseError) and "MISCONF" in str(e):
        if verbose:
            traceback.print_exc()
        # The server refuses writes because it cannot persist them (a full or failing disk).
        # (Inside a pipeline's error the reply comes after "Command # N (...) of pipeline".)
        reply = str(e)[str(e).index("MISCONF") :]
        then = f", then run '{resume}'" if resume else ""
        say(f"the Redis server cannot write to its disk, so it refuses writes: {reply}{then}")
        return int(ExitStatus.REDIS_UNAVAILABLE)
    if isinstance(e, redis.RedisError):
        if verbose:
            traceback.print_exc()
        say(f"Redis refused a command: {e}")
        return int(ExitStatus.REDIS_UNAVAILABLE)
    if isinstance(e, PipelineError):
        if verbose:
            traceback.print_exc()
        say(str(e) + disk_advice(e, resume))
        return int(e.exit_status)
    if isinstance(e, OSError) and e.filename is not None:
        # A file the command needs (besides the input, the output and the data directory,
        # which have their own messages): a read-only or full disk, permissions.
        if verbose:
            traceback.print_exc()
        say(f"cannot use {os.fsdecode(e.filename)}: {e.strerror}")
        return int(ExitStatus.NO_INPUT)
    raise e


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
