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
    whatever the number of partitions and workers. A partition's epochs and lines
    are kept in two lists, as its notices carry them: no pair per line.
    """

    def __init__(self) -> None:
        # partition -> (epochs, lines) in order; the ones before start[p] are taken
        self._queues: dict[int, tuple[list[int], list[Any]]] = {}
        self._start: dict[int, int] = {}
        self.held = 0  # lines waiting for an earlier epoch to commit

    def add(self, partition: int, epochs: list[int], lines: list[Any]) -> None:
        """Add a partition's committed lines, with the epoch of each (in epoch order)."""
        if lines:
            if partition not in self._queues:
                self._queues[partition] = ([], [])
                self._start[partition] = 0
            held_epochs, held_lines = self._queues[partition]
            held_epochs += epochs
            held_lines += lines
            self.held += len(lines)

    def pop_through(self, epoch: int) -> list[Any]:
        """Remove and return, in epoch order, every line with an epoch <= ``epoch``."""
        runs: list[tuple[list[int], list[Any]]] = []
        for p, (epochs, lines) in self._queues.items():
            start = self._start[p]
            if start < len(epochs) and epochs[start] <= epoch:
                end = bisect_right(epochs, epoch, lo=start)
                runs.append((epochs[start:end], lines[start:end]))
                if end > len(epochs) // 2:
                    del epochs[:end], lines[:end]  # compact now and then, not on every call
                    end = 0
                self._start[p] = end
        taken = sum(len(run_lines) for _, run_lines in runs)
        self.held -= taken
        if len(runs) <= 1:
            return runs[0][1] if runs else []
        # Timsort merges the already-sorted runs of epochs in C; a partition's lines of one
        # epoch stay in their order (the sort is stable and compares epochs only).
        all_epochs = [e for run_epochs, _ in runs for e in run_epochs]
        all_lines = [line for _, run_lines in runs for line in run_lines]
        order = sorted(range(taken), key=all_epochs.__getitem__)
        return list(itemgetter(*order)(all_lines)) if taken > 1 else all_lines

    def drop_from(self, epoch: int) -> None:
        """Forget lines with an epoch >= ``epoch`` (a run that stops there will not print them)."""
        for p, (epochs, lines) in self._queues.items():
            cut = bisect_left(epochs, epoch, lo=self._start[p])
            self.held -= len(epochs) - cut
            del epochs[cut:], lines[cut:]


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
