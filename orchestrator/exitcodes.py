"""Exit statuses of the ``orchestrator`` command, for scripts to act on."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Process exit codes."""

    OK = 0
    FAILED = 1  # an internal error: a worker failed, a bug; details with --verbose
    USAGE = 2  # a bad option, or a command that does not fit the namespace's state
    # Redis cannot be reached, or the embedded server cannot start; also Redis's disk:
    # the embedded server stopped (its data directory full), or MISCONF (refuses writes)
    REDIS_UNAVAILABLE = 3
    DATA_ERROR = 65  # bad input under --on-error fail (sysexits' EX_DATAERR)
    # the input file cannot be read (missing, gzip-compressed, a pipe or stdin), or no longer
    # matches the committed position; or the --output file cannot be opened or written (a
    # directory, a missing folder, a full disk), or the embedded server's data directory
    # cannot be (a read-only file system)
    NO_INPUT = 66
    LOCKED = 75  # another driver runs on the namespace (sysexits' EX_TEMPFAIL): try later
    INTERRUPTED = 130  # Ctrl-C; committed state is intact, resume continues
    OUTPUT_CLOSED = 141  # the reader of stdout went away (`| head`), as SIGPIPE in a shell
