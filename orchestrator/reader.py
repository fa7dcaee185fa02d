"""Reading the input: one epoch per line, from a byte offset, without reading what comes before."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.errors import PipelineError


class InputError(PipelineError):
    """Raised when the input file cannot be read or does not match the committed position."""


@dataclass(frozen=True)
class InputLine:
    """One line of input: its epoch, where it starts and ends in the file, and its bytes."""

    epoch: int
    offset: int
    end: int
    data: bytes

    @property
    def line_number(self) -> int:
        """1-based line number (epochs are 0-based line indexes)."""
        return self.epoch + 1


def open_input(path: Path) -> BinaryIO:
    """Open an input file for reading, with a clear error."""
    try:
        return open(path, "rb")  # noqa: SIM115
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise InputError(msg) from None


def read_lines(f: BinaryIO, epoch: int, offset: int) -> Iterator[InputLine]:
    """Yield lines from ``offset`` on, numbering them from ``epoch``."""
    f.seek(offset)
    for data in f:
        end = offset + len(data)
        yield InputLine(epoch, offset, end, data)
        epoch += 1
        offset = end


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
