"""Merging the partitions' committed output lines into one stream in epoch order, and handing
them to the sink: written to a file or stdout at once, or held for a Redis stream."""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, BinaryIO

from orchestrator.errors import InputError, OutputError
from orchestrator.progress import clear_line
from orchestrator.settings import STREAM_OUTPUT


def output_name(out: BinaryIO) -> str | None:
    """The path of a file opened by name, None for standard output (or another stream)."""
    name = getattr(out, "name", None)
    return name if isinstance(name, str) and not name.startswith("<") else None


class OutputMerger:
    """Holds committed lines of each partition until every epoch before them is committed.

    Each partition's lines arrive in epoch order; a line is released once the
    namespace-wide committed epoch reaches it, so the output is in epoch order
    whatever the number of partitions and workers.
    """

    def __init__(self) -> None:
        # partition -> [epoch, line] pairs in order; the ones before start[p] are taken
        self._queues: dict[int, list[Any]] = {}
        self._start: dict[int, int] = {}
        self.held = 0  # lines waiting for an earlier epoch to commit

    def add(self, partition: int, lines: list[Any]) -> None:
        """Add a partition's committed ``[epoch, line]`` pairs (in epoch order)."""
        if lines:
            self._queues.setdefault(partition, []).extend(lines)
            self._start.setdefault(partition, 0)
            self.held += len(lines)

    def pop_through(self, epoch: int) -> list[bytes]:
        """Remove and return, in epoch order, every line with an epoch <= ``epoch``."""
        runs = []
        for p, queue in self._queues.items():
            start = self._start[p]
            if start < len(queue) and queue[start][0] <= epoch:
                end = bisect_right(queue, epoch, lo=start, key=_epoch)
                runs.append(queue[start:end])
                if end > len(queue) // 2:
                    del queue[:end]  # compact now and then, not on every call
                    end = 0
                self._start[p] = end
        self.held -= sum(len(run) for run in runs)
        if len(runs) <= 1:
            return [line for _, line in runs[0]] if runs else []
        # Timsort merges the already-sorted runs in C; a partition's lines of one epoch
        # stay in their order (the sort is stable and compares epochs only).
        merged = sorted([pair for run in runs for pair in run], key=_epoch)
        return [line for _, line in merged]

    def drop_from(self, epoch: int) -> None:
        """Forget lines with an epoch >= ``epoch`` (a run that stops there will not print them)."""
        for p, queue in self._queues.items():
            cut = bisect_left(queue, epoch, lo=self._start[p], key=_epoch)
            self.held -= len(queue) - cut
            del queue[cut:]


_epoch = itemgetter(0)


@dataclass
class OutputStream:
    """An ``--output redis-stream:KEY``: the lines of committed epochs, held until the next
    record of the committed epoch, which adds them to the stream in the same script.

    Each line (``EPOCH JSON``) becomes one entry with the fields ``epoch`` and ``output``
    (the JSON). Held, not sent at once: an entry in the stream for an epoch the namespace
    has not recorded as committed would be written again by the resume after a crash.
    """

    key: str
    maxlen: int | None = None  # --output-maxlen: trimmed to that many entries at each record
    held: list[bytes] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How it is given to --output, and recorded in the namespace (``status`` shows it)."""
        return f"{STREAM_OUTPUT}{self.key}"

    def add(self, lines: list[bytes]) -> None:
        """Hold the lines of newly committed epochs (in epoch order)."""
        self.held.extend(lines)

    def take(self) -> list[tuple[bytes, bytes]]:
        """The held lines as (epoch, output) pairs, for the record that commits them."""
        lines, self.held = self.held, []
        return [_split_line(line) for line in lines]


def wrong_stream_type(name: str, kind: str) -> InputError:
    """The error for an output stream whose key holds another type of value."""
    key = name.removeprefix(STREAM_OUTPUT)
    msg = (
        f"--output {name}: the key {key!r} holds a {kind}, not a stream; "
        f"use another key, or delete it"
    )
    return InputError(msg)


def _split_line(line: bytes) -> tuple[bytes, bytes]:
    epoch, _, output = line.partition(b" ")
    return epoch, output


def write_lines(out: BinaryIO, lines: list[bytes]) -> None:
    """Write lines and flush, so that they are out before the commit that follows them.

    Raises:
        OutputError: the write failed (a full disk); BrokenPipeError is left as it is.
    """
    if lines:
        clear_line(out)  # (a stdout on the terminal of the progress line)
        try:
            out.write(b"\n".join(lines))
            out.write(b"\n")
            out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(output_name(out), e) from e


def synced_length(out: BinaryIO) -> int:
    """Flush and fsync an output file; its length, which is then on disk.

    Raises:
        OutputError: the flush or the fsync failed: the length must not be recorded.
    """
    try:
        out.flush()
        os.fsync(out.fileno())
    except OSError as e:
        raise OutputError(output_name(out), e) from e
    return out.tell()
