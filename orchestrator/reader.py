"""Reading the input: one epoch per line, from a byte offset, without reading what comes before."""

from __future__ import annotations

import hashlib
import io
import os
import queue
import shlex
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from orchestrator.errors import InputError
from orchestrator.settings import Settings
from orchestrator.streamsource import StreamInput

FINGERPRINT_BLOCK = 4096
FINGERPRINT_SAMPLES = 16


@dataclass
class LineSource:
    """An input file being read: the epoch and byte offset of its next line.

    Followed (``follow``), its end is only where the data stops for now: a line without
    its newline is read again once more has arrived, and the file is watched for being
    truncated or replaced (``gone``), which ends the run.
    """

    file: Input | StreamInput
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
        if isinstance(self.file, PipeInput | StreamInput):
            self.file.blocking = False  # the driver goes on committing while it waits
            return
        self.file.seek(self.offset)
        st = os.fstat(self.file.fileno())
        self._identity = (st.st_dev, st.st_ino)

    @property
    def waits(self) -> bool:
        """Whether the end of the data so far may not be the end: a followed file, or a
        pipe that its writer has not closed (following a pipe changes nothing)."""
        if isinstance(self.file, PipeInput | StreamInput):
            return not self.file.ended
        return self.follow

    def wait_at(self, offset: int, data: bytes) -> None:
        """No whole line at ``offset`` yet (``data`` is what came of it): it is read again
        from its start later."""
        if isinstance(self.file, PipeInput | StreamInput):
            self.file.unread(data)
        else:
            self.file.seek(offset)

    def finished(self) -> bool:
        """At the end of the data for now: whether no more lines will ever come."""
        if isinstance(self.file, PipeInput | StreamInput):
            return self.file.ended
        return not self.follow or self.gone()

    def rejection(self) -> str | None:
        """Why the line just read, without a newline, is bad (a stream's entry), if it is."""
        return self.file.rejection if isinstance(self.file, StreamInput) else None

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
        assert not isinstance(self.file, StreamInput)  # (a stream is never followed as a file)
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


def open_input(path: Path) -> Input:
    """Open the input for reading, with a clear error: a file, or standard input (``-``) or
    another pipe (a FIFO, ``/dev/stdin``), read from its first byte.

    Raises:
        InputError: it cannot be opened, or it is gzip-compressed.
    """
    try:
        if str(path) == "-":
            fd = os.dup(sys.stdin.fileno())
        else:
            fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise InputError(msg) from None
    f: Input
    if _seekable(fd):
        f = os.fdopen(fd, "rb")
    else:  # a pipe (`cat f | orchestrator ingest -`), a FIFO, a tty
        f = PipeInput(fd)
    try:
        _check_readable(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _seekable(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return False
    return True


def _check_readable(f: Input, path: Path) -> None:
    try:
        magic = f.peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)]
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise InputError(msg) from None
    if magic == GZIP_MAGIC:  # (no JSON line starts with these bytes)
        name = shlex.quote(str(path))
        how = f"gunzip -k {name}" if path.suffix == ".gz" else f"gunzip -c {name} > events.json"
        msg = f"{path}: gzip-compressed input: decompress it first (e.g. {how})"
        raise InputError(msg)


PIPE_CHUNK = 1 << 16
PIPE_READ_AHEAD = 64  # chunks a pipe's reader thread may hold ahead of the driver (4 MiB)
COMPACT_AT = 1 << 20


class PipeInput:
    """Standard input or another pipe, read by a thread so that the driver never blocks on it.

    ``readline`` returns what has arrived: a whole line, a line cut at the limit, or,
    when no more has come yet, the start of a line without its newline (or nothing),
    which the driver gives back (``unread``) and asks for again later; ``ended`` says
    the writer closed the pipe and everything has been read. While ``blocking``, it
    waits for a whole line instead (the resume's skip, the oversized line's rest).

    Every byte is hashed in order (sha256): ``hash_at(offset)`` is the hash of the bytes
    before ``offset``, recorded with the committed epoch, which ``resume -`` compares
    with the input it is given again.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.blocking = True
        self._chunks: queue.Queue[bytes | OSError] = queue.Queue(PIPE_READ_AHEAD)
        self._buf = bytearray()
        self._pos = 0  # in _buf, of the next byte readline returns
        self._eof = False  # the writer closed the pipe (and the reader took that in)
        self._mid_line = False  # the last line returned was cut at the limit
        self._received = 0  # bytes taken from the reader thread
        self._unhashed: deque[tuple[int, bytes]] = deque()  # (offset, chunk) not hashed yet
        self._hash = hashlib.sha256()
        self._hashed_to = 0
        self.watch: Callable[[int, bytes], None] | None = None  # sees every hashed chunk
        self.position = 0  # offset in the input of the next byte readline returns
        # Started at the first read after the command's worker processes are forked (a
        # thread running at a fork is a hazard: the child inherits its locks as they were).
        self._reader: threading.Thread | None = None

    def _pump(self) -> None:
        while True:
            try:
                data: bytes | OSError = os.read(self.fd, PIPE_CHUNK)
            except OSError as e:
                data = e
            self._chunks.put(data)
            if not data or isinstance(data, OSError):
                return

    def _take(self, block: bool) -> bool:
        """Move one chunk from the reader thread to the buffer; whether one came."""
        if self._eof:
            return False
        if self._reader is None:
            self._reader = threading.Thread(target=self._pump, name="input-reader", daemon=True)
            self._reader.start()
        try:
            data = self._chunks.get(timeout=0.1) if block else self._chunks.get_nowait()
        except queue.Empty:
            return False
        return self._add(data)

    def _add(self, data: bytes | OSError) -> bool:
        if isinstance(data, OSError):
            raise data
        if not data:
            self._eof = True
            return False
        if self._pos >= COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        self._unhashed.append((self._received, data))
        self._received += len(data)
        return True

    @property
    def ended(self) -> bool:
        """The writer closed the pipe and every byte has been read."""
        if not self._eof and self._pos == len(self._buf):
            self._take(block=False)
        return self._eof and self._pos == len(self._buf)

    def peek(self, n: int) -> bytes:
        """The first bytes, waiting for some (read here: no reader thread yet); not consumed."""
        if self._reader is None and not self._eof and len(self._buf) < n:
            self._add(os.read(self.fd, PIPE_CHUNK))
        return bytes(self._buf[self._pos : self._pos + n])

    def readline(self, limit: int = -1) -> bytes:
        """The next line, as much of it as ``limit`` allows, or what has arrived of it."""
        block = self.blocking or self._mid_line
        while True:
            end = len(self._buf) if limit < 0 else min(len(self._buf), self._pos + limit)
            i = self._buf.find(b"\n", self._pos, end)
            if i >= 0:
                n, cut = i + 1 - self._pos, False
                break
            if limit >= 0 and len(self._buf) - self._pos >= limit:
                n, cut = limit, True
                break
            if not self._take(block) and (self._eof or not block):
                n, cut = len(self._buf) - self._pos, False
                break
        line = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self.position += n
        self._mid_line = cut
        return line

    def unread(self, data: bytes) -> None:
        """Give back the last ``data`` readline returned: it is returned again."""
        self._pos -= len(data)
        self.position -= len(data)

    def skip_to(self, offset: int) -> int:
        """Read (and hash) the input up to ``offset``; the offset reached (less at its end)."""
        while self.position < offset:
            if self._pos == len(self._buf) and not self._take(block=True) and self._eof:
                break
            n = min(offset - self.position, len(self._buf) - self._pos)
            self._pos += n
            self.position += n
            self.hash_at(self.position)  # as it goes: the chunks are not kept
        return self.position

    def hash_at(self, offset: int) -> str:
        """The sha256 of the input's bytes before ``offset`` (which never goes back)."""
        assert self._hashed_to <= offset <= self._received, (self._hashed_to, offset)
        while self._hashed_to < offset:
            start, chunk = self._unhashed[0]
            part = chunk[self._hashed_to - start : offset - start]
            self._hash.update(part)
            if self.watch is not None:
                self.watch(self._hashed_to, part)
            self._hashed_to += len(part)
            if self._hashed_to == start + len(chunk):
                self._unhashed.popleft()
        return self._hash.hexdigest()

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        # Not while the reader thread may still read it: the number could be reused by a
        # file opened next, which the thread would then read. It goes with the process.
        if self._reader is None or not self._reader.is_alive():
            os.close(self.fd)

    def __enter__(self) -> PipeInput:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# An input: a file (seekable), or a pipe read from its start.
Input = io.BufferedReader | PipeInput


def finish_oversized(
    f: Input | StreamInput, start: bytes, max_line_bytes: int
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


class StreamFingerprint:
    """``fingerprint`` of a prefix of an input read once, in order, from its start (a pipe):
    it keeps the sampled blocks as the bytes go by (``feed``)."""

    def __init__(self, end: int) -> None:
        self.end = end
        starts = {0, max(0, end - FINGERPRINT_BLOCK)}
        starts |= {end * i // FINGERPRINT_SAMPLES for i in range(1, FINGERPRINT_SAMPLES)}
        self.blocks = {s: bytearray() for s in sorted(starts)}

    def feed(self, offset: int, data: bytes) -> None:
        for start, block in self.blocks.items():
            stop = start + min(FINGERPRINT_BLOCK, self.end - start)
            lo, hi = max(start, offset), min(stop, offset + len(data))
            if lo < hi:
                block += data[lo - offset : hi - offset]

    def digest(self) -> str:
        h = hashlib.sha256(str(self.end).encode())
        for block in self.blocks.values():
            h.update(block)
        return h.hexdigest()[:32]


def file_sha256(f: Input, end: int) -> str:
    """The sha256 of a file's first ``end`` bytes (read with pread: the position stays)."""
    h, at, fd = hashlib.sha256(), 0, f.fileno()
    while at < end:
        data = os.pread(fd, min(1 << 20, end - at), at)
        if not data:
            break
        h.update(data)
        at += len(data)
    return h.hexdigest()


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
    return read_to_epoch(f, path, epoch, offset, target)


def read_to_epoch(f: Any, path: Path, epoch: int, offset: int, target: int) -> int:
    """Read lines from (epoch, offset), where ``f`` stands, up to line ``target``; return its
    offset.

    Raises:
        InputError: the input ends before line ``target``.
    """
    while epoch < target:
        data = f.readline()
        if not data:
            msg = f"{path} has only {epoch} lines; epoch {target} is past its end"
            raise InputError(msg)
        offset += len(data)
        epoch += 1
    return offset
