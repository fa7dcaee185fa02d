"""The pipeline's errors (one base class, a few specific ones) and the exit statuses they
end a command with (``orchestrator/errors.py`` has the driver's own)."""

from __future__ import annotations

import enum
from typing import ClassVar


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


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.FAILED


class InvalidEvent(PipelineError):
    """Raised when an input item is not an event the flow accepts (bad shape, missing field)."""


class FlowError(PipelineError):
    """Raised when a flow is built wrongly or cannot be loaded by its import path."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


class StaleGeneration(PipelineError):
    """Raised when a batch belongs to a driver run that has been superseded."""


class OutOfOrder(PipelineError):
    """Raised when a batch arrives before the batch that precedes it in its partition.

    ``applied`` is the epoch the batch found its partition at (None: the partition
    changed under it on every try). A batch is sent only once the driver saw the
    one before it commit, so a partition found short of it went back in time.
    """

    def __init__(self, msg: str, applied: int | None = None) -> None:
        super().__init__(msg)
        self.applied = applied


class CommitTooLarge(PipelineError):
    """Raised when one commit would carry more than Redis takes in one argument: the output
    or state of a single event (commits are bounded by bytes, but never split an epoch)."""


class NamespaceError(PipelineError):
    """Raised when a command does not fit the namespace's stored state (partitions, epochs)."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


class RedisUnavailable(PipelineError):
    """Raised when Redis cannot be reached or the embedded server cannot start."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.REDIS_UNAVAILABLE


class RedisLostData(RedisUnavailable):
    """Raised when Redis holds less than it acknowledged: a lost append-only-file tail, a failover
    to a lagging replica, evicted keys, or a restart without persistence."""


class TornWrite(RedisLostData):
    """Raised when Redis holds part of a transaction: its append-only file was cut inside a
    MULTI/EXEC block and it restarted twice since (Redis keeps the block's start in the file
    at the first restart and runs it at the second, with whatever was written after it)."""


class Superseded(PipelineError):
    """Raised when another driver run has taken over the namespace from this one."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.LOCKED
