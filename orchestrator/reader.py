"""Reading the input: one epoch per line, from a byte offset, without reading what comes before."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.errors import PipelineError


class InputError(PipelineError):
    """Raised when the input file cannot be read or does not match the committed position."""


DEFAULT_MAX_LINE_BYTES = 1 << 20
FINGERPRINT_BLOCK = 4096
FINGERPRINT_SAMPLES = 16


@dataclass
class LineSource:
    """An input file being read: the epoch and byte offset of its next line."""

    file: BinaryIO
    epoch: int
    offset: int
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES

    def __post_init__(self) -> None:
        self.file.seek(self.offset)


def open_input(path: Path) -> BinaryIO:
    """Open an input file for reading, with a clear error."""
    try:
        return open(path, "rb")  # noqa: SIM115
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise InputError(msg) from None


def finish_oversized(f: BinaryIO, start: bytes, max_line_bytes: int) -> tuple[bytes, int, str]:
    """Skip the rest of a line longer than the limit, without holding it in memory.

    Returns:
        (its first bytes, its whole size, the reason it is rejected).
    """
    size = len(start)
    while True:
        chunk = f.readline(1 << 20)
        size += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            break
    return start[:200], size, f"line is {size:,} bytes, over the {max_line_bytes:,}-byte limit"


def fingerprint(f: BinaryIO, end: int) -> str:
    """A fingerprint of the file's first ``end`` bytes from a few sampled blocks (no full read).

    It changes when the prefix is truncated, replaced, or edited in its first or
    last block or at one of the sampled places; it ignores everything after ``end``.
    """
    h = hashlib.sha256(str(end).encode())
    starts = {0, max(0, end - FINGERPRINT_BLOCK)}
    starts |= {end * i // FINGERPRINT_SAMPLES for i in range(1, FINGERPRINT_SAMPLES)}
    for start in sorted(starts):
        f.seek(start)
        h.update(f.read(min(FINGERPRINT_BLOCK, end - start)))
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
