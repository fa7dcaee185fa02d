"""Where output lines go: stdout (at-least-once), an --output file or a Redis stream
(exactly-once).

The file's length is recorded with every committed epoch (after an fsync), so
a run that resumes or replays first cuts the file back to what the epochs
before its start wrote: after any crash the file holds each epoch's lines
once, in order. Stdout cannot be taken back: after a crash, ``resume`` may
print again the lines written since the last record.

A Redis stream (``--output redis-stream:KEY``, on the pipeline's Redis) gets its
entries from the script that records the committed epoch (``OutputStream`` holds
the lines until then; ``tasks/lua/record_progress.lua`` adds them): the stream
and the record cannot disagree, so nothing needs cutting back after a crash.
A run's first record deletes the entries of the epochs it is about to process
again (a replay's, or a resumed unterminated last line's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from redis import Redis

from orchestrator.errors import DriverLocked, InputError, OutputError
from orchestrator.namespace import Checkpoint, NamespaceInfo
from orchestrator.output import OutputStream, wrong_stream_type
from orchestrator.settings import Mode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sink:
    """The output of a run: a stream, and (for a file) its path and starting length, or (for
    --output redis-stream:KEY) the Redis stream its lines are held for."""

    stream: BinaryIO
    path: str | None
    start_length: int | None
    entries: OutputStream | None = None

    @property
    def name(self) -> str | None:
        """The output recorded in the namespace: the file's path or ``redis-stream:KEY``."""
        return self.entries.name if self.entries is not None else self.path


def check_output_stream(r: Redis, stream: OutputStream) -> None:
    """Refuse a key that is not a stream, or a stream the pipeline did not write.

    Its entries must all have been written by runs of the pipeline: a run deletes those
    of the epochs it processes again, and would interleave its own with anyone else's.

    Raises:
        InputError: the key holds another type, or its last entry has no ``epoch`` field.
    """
    kind = r.type(stream.key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind not in ("none", "stream"):
        raise wrong_stream_type(stream.name, kind)
    last = cast("list[tuple[bytes, dict[bytes, bytes]]]", r.xrevrange(stream.key, count=1))
    if last and not last[0][1].get(b"epoch", b"").isdigit():
        msg = (
            f"--output {stream.name}: the stream holds entries that are not output lines of "
            f"the pipeline (its last one, {last[0][0].decode()}, has no epoch field); "
            f"use another key"
        )
        raise InputError(msg)


def cut_point(path: Path, checkpoint: Checkpoint, epoch: int) -> int:
    """Where the lines of ``epoch`` and later start in an output file, reading from a checkpoint.

    Lines are ``EPOCH JSON``: the file is read forward from the checkpoint's
    recorded length to the first line of an epoch >= ``epoch``.
    """
    assert checkpoint.output_length is not None
    position = checkpoint.output_length
    with open(path, "rb") as f:
        f.seek(position)
        for line in f:
            head = line.split(b" ", 1)[0]
            if not line.endswith(b"\n") or not head.isdigit() or int(head) >= epoch:
                break
            position += len(line)
    return position


def ends_with_epoch(path: Path, length: int, epoch: int) -> bool:
    """Whether the file's first ``length`` bytes end with a whole line of an epoch <= ``epoch``
    and any line after them is of a later epoch: the file confirms the recorded length."""
    window = 64 * 1024
    with open(path, "rb") as f:
        f.seek(max(0, length - window))
        start = f.tell()
        head = f.read(length - start)
        after = f.readline()
    if length and not head.endswith(b"\n"):
        return False
    before, newline, last = head[:-1].rpartition(b"\n")
    if newline or start == 0:  # the last line is whole in the window: check its epoch
        number = last.split(b" ", 1)[0]
        if last and not (number.isdigit() and int(number) <= epoch):
            return False
    number = after.split(b" ", 1)[0]
    return not (after.endswith(b"\n") and number.isdigit() and int(number) <= epoch)


def recorded_length(
    path: Path, mode: Mode, info: NamespaceInfo, checkpoint: Checkpoint, epoch: int
) -> int | None:
    """How long the output file must be before this run writes to it; None if unknown."""
    if mode == "ingest":
        return 0
    if info.output != str(path):
        return None
    if mode == "resume":
        return info.output_length
    return cut_point(path, checkpoint, epoch) if checkpoint.output_length is not None else None


def hold_exclusively(f: BinaryIO, shown: Path) -> None:
    """Lock the output file for this run (released when it is closed), or refuse.

    A driver that was paused (SIGSTOP, a frozen VM) past its namespace lock's TTL
    still holds the file: another run must not cut or write it under the paused
    one, whose pending write would then land in the middle of the new run's lines.

    Raises:
        DriverLocked: another process holds the file.
    """
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        msg = (
            f"the output file {shown} is in use by another process (a driver that is still "
            f"running, or stopped: find it with 'fuser {shown}'); stop it first, or use "
            f"another --output"
        )
        raise DriverLocked(msg) from None


@contextlib.contextmanager
def open_sink(
    output: Path | OutputStream | None,
    mode: Mode,
    info: NamespaceInfo,
    checkpoint: Checkpoint,
    epoch: int,
    r: Redis | None = None,
) -> Iterator[Sink]:
    """Standard output, or the output file cut back to the recorded length of the epochs before
    ``epoch`` (created empty by ingest), or a Redis stream (checked on ``r``; its entries of
    epochs from ``epoch`` on are deleted by the run's first record).

    Raises:
        InputError: the file is shorter than the recorded length (changed by someone else);
            the stream's key holds something else.
        OutputError: the file cannot be opened, cut back or synced (a directory, a missing
            folder, a full disk); or, on leaving, flushed.
    """
    if isinstance(output, OutputStream):
        if r is not None:
            check_output_stream(r, output)
        yield Sink(sys.stdout.buffer, None, None, output)
        return
    if output is None:
        sys.stdout.flush()
        yield Sink(sys.stdout.buffer, None, None)
        return
    path = output.resolve()
    try:
        f, length = _open_cut(output, path, mode, info, checkpoint, epoch)
    except OSError as e:
        raise OutputError(str(output), e, "open") from e
    try:
        yield Sink(f, str(path), length)
    except BaseException:
        # The run failed (perhaps writing to this file): what is still buffered cannot
        # matter, since nothing after the last record counts; closing must not hide why.
        with contextlib.suppress(OSError):
            f.close()
        raise
    try:
        f.close()
    except OSError as e:
        raise OutputError(str(path), e) from e


def _open_cut(
    output: Path, path: Path, mode: Mode, info: NamespaceInfo, checkpoint: Checkpoint, epoch: int
) -> tuple[BinaryIO, int]:
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    length = recorded_length(path, mode, info, checkpoint, epoch) if path.exists() else 0
    size = path.stat().st_size if path.exists() else 0
    if length is None:
        logger.warning(
            "%s is not the output file recorded for this namespace: appending to it "
            "(exactly-once output needs the same --output as the run that is continued)",
            output,
        )
        length = size
    elif size < length:
        msg = (
            f"the output file {output} is shorter ({size} bytes) than the {length} bytes "
            f"recorded for the committed epochs: was it changed? Use another --output"
        )
        raise InputError(msg)
    elif mode == "resume" and path.exists() and not ends_with_epoch(path, length, info.committed):
        msg = (
            f"the output file {output} does not match the namespace's record: byte {length} "
            f"is not where the lines of epochs up to {info.committed} end (was it changed, or "
            f"written by another run?); use another --output"
        )
        raise InputError(msg)
    f = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 - open_sink closes it
    try:
        hold_exclusively(f, output)
        f.truncate(length)
        f.seek(length)
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        f.close()
        raise
    return f, length
