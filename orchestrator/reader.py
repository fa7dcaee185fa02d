"""Reading the input: one epoch per line, from a byte offset, without reading what comes before."""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from orchestrator.errors import InputError
from orchestrator.settings import Settings

FINGERPRINT_BLOCK = 4096
FINGERPRINT_SAMPLES = 16


@dataclass
class LineSource:
    """An input file being read: the epoch and byte offset of its next line.

    Followed (``follow``), its end is only where the data stops for now: a line without
    its newline is read again once more has arrived, and the file is watched for being
    truncated or replaced (``gone``), which ends the run.
    """

    file: BinaryIO
    epoch: int
    offset: int
    max_line_bytes: int = Settings.max_line_bytes
    follow: bool = False
    path: Path | None = None
    # why a followed file stopped being read (it was truncated or replaced), once it did
    stopped: str | None = None
    _identity: tuple[int, int] = (0, 0)
    _suspect: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.file.seek(self.offset)
        st = os.fstat(self.file.fileno())
        self._identity = (st.st_dev, st.st_ino)

    def wait_at(self, offset: int) -> None:
        """Followed: no whole line at ``offset`` yet; it is read again from its start later."""
        self.file.seek(offset)

    def gone(self) -> bool:
        """Followed, at the end of the data: whether the file was truncated or replaced.

        The first time a change is seen, the run reads once more what the old file got
        before it (a writer appends, then rotates); the second time, it stops.
        """
        reason = self._change()
        if reason is None:
            self._suspect = False
            return False
        if not self._suspect:
            self._suspect = True
            return False
        self.stopped = reason
        return True

    def _change(self) -> str | None:
        size = os.fstat(self.file.fileno()).st_size
        if size < self.offset:
            return f"was truncated (to {size:,} bytes, before the read position {self.offset:,})"
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "was removed or renamed"
        if (st.st_dev, st.st_ino) != self._identity:
            return "was replaced (another file has its name now)"
        return None


GZIP_MAGIC = b"\x1f\x8b"

NOT_A_FILE = (
    "reading the input from {what} is not supported yet: the resume point is a byte "
    "offset to seek to, so save the input to a file and pass its name"
)


def open_input(path: Path) -> BinaryIO:
    """Open an input file for reading, with a clear error.

    Raises:
        InputError: it cannot be opened, it is standard input or a pipe (a run seeks
            to its resume point), or it is gzip-compressed.
    """
    if str(path) == "-":
        raise InputError(NOT_A_FILE.format(what="standard input ('-')"))
    try:
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise InputError(msg) from None
    try:
        _check_readable(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_readable(f: BinaryIO, path: Path) -> None:
    if not f.seekable():  # a pipe (`cat f | orchestrator ingest /dev/stdin`), a FIFO, a tty
        raise InputError(NOT_A_FILE.format(what=f"a pipe ({path})"))
    try:
        magic = f.read(len(GZIP_MAGIC))
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise InputError(msg) from None
    if magic == GZIP_MAGIC:  # (no JSON line starts with these bytes)
        name = shlex.quote(str(path))
        how = f"gunzip -k {name}" if path.suffix == ".gz" else f"gunzip -c {name} > events.json"
        msg = f"{path}: gzip-compressed input: decompress it first (e.g. {how})"
        raise InputError(msg)
    f.seek(0)


def finish_oversized(
    f: BinaryIO, start: bytes, max_line_bytes: int
) -> tuple[bytes, int, str, bool]:
    """Skip the rest of a line longer than the limit, without holding it in memory.

    Returns:
        (its first bytes, its whole size, the reason it is rejected, whether it ends with a
        newline: the file's last line may not, and may still be growing).
    """
    size = len(start)
    while True:
        chunk = f.readline(1 << 20)
        size += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            break
    reason = f"line is {size:,} bytes, over the {max_line_bytes:,}-byte limit"
    return start[:200], size, reason, chunk.endswith(b"\n")


def fingerprint(f: BinaryIO, end: int) -> str:
    """A fingerprint of the file's first ``end`` bytes from a few sampled blocks (no full read).

    It changes when the prefix is truncated, replaced, or edited in its first or
    last block or at one of the sampled places; it ignores everything after ``end``.
    """
    h = hashlib.sha256(str(end).encode())
    starts = {0, max(0, end - FINGERPRINT_BLOCK)}
    starts |= {end * i // FINGERPRINT_SAMPLES for i in range(1, FINGERPRINT_SAMPLES)}
    fd = f.fileno()
    for start in sorted(starts):
        # pread: the driver reads the same file object, and its position must not move
        h.update(os.pread(fd, min(FINGERPRINT_BLOCK, end - start), start))
    return h.hexdigest()[:32]


def seek_epoch(f: BinaryIO, path: Path, epoch: int, offset: int, target: int) -> int:
    """Return the byte offset of line ``target``, counting lines from a known (epoch, offset).

    Raises:
        InputError: the file ends before line ``target`` or before ``offset``.
    """
    size = f.seek(0, 2)
    if offset > size:
        msg = (
            f"{path} is shorter ({size} bytes) than the committed position (byte {offset}, "
            f"epoch {epoch}): was it truncated or replaced?"
        )
        raise InputError(msg)
    f.seek(offset)
    while epoch < target:
        data = f.readline()
        if not data:
            msg = f"{path} has only {epoch} lines; epoch {target} is past its end"
            raise InputError(msg)
        offset += len(data)
        epoch += 1
    return offset
