"""The driver's errors, each with the exit status it ends a command with.

The pipeline's own (what workers raise too) are in ``tasks/errors.py``.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import ClassVar

from tasks.errors import ExitStatus, PipelineError, RedisUnavailable

# Errors after which the same command, run again, can succeed once the disk is fixed.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


class InputError(PipelineError):
    """Raised when the input file cannot be read or does not match the committed position."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.NO_INPUT


class OutputError(PipelineError):
    """Raised when the output (an --output file, or stdout) cannot be opened or written.

    Nothing is recorded after a failed write or fsync, so the committed record
    never claims more than the file holds; ``resume`` cuts the file back to it.
    """

    exit_status: ClassVar[ExitStatus] = ExitStatus.NO_INPUT

    def __init__(self, path: str | None, error: OSError, doing: str = "write") -> None:
        self.path = path
        self.errno = error.errno
        what = "standard output" if path is None else f"the output file {path}"
        super().__init__(f"cannot {doing} {what}: {error.strerror or error}")

    @property
    def disk_error(self) -> bool:
        """A full (or failing) disk: freeing space and resuming gives the exact file."""
        return self.errno in DISK_ERRORS


class DriverLocked(PipelineError):
    """Raised when another driver is running on the namespace."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.LOCKED


class RedisUrlError(PipelineError):
    """Raised when a Redis URL cannot be used (bad scheme, address or option)."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


class WorkerFailed(PipelineError):
    """Raised when a batch job failed in a worker for a reason other than the input."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.FAILED


class WorkerDied(PipelineError):
    """Raised when the worker processes started by the command keep dying."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.FAILED


class ServerStopped(RedisUnavailable):
    """Raised when the embedded redis-server exits while the command uses it.

    It happens when the server cannot write its append-only file: with
    ``appendfsync always`` redis-server exits rather than acknowledge a write it
    could not persist ("Can't recover from AOF write error ... Exiting"), so
    whatever it acknowledged is on disk and a later ``resume`` continues from it.
    """

    def __init__(self, data_dir: Path, reason: str, *, no_space: bool, disk: bool) -> None:
        self.data_dir = data_dir
        self.reason = reason
        self.no_space = no_space
        self.disk = disk  # it could not write to its disk (else it was killed, or crashed)
        super().__init__(f"the embedded redis-server stopped: {reason}")


class DataDirError(PipelineError):
    """Raised when the data directory cannot hold the embedded server (missing, read-only)."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.NO_INPUT
