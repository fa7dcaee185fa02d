"""The driver: read epochs, route keyed events to partition queues, collect commits, emit output.

One batch per partition is in flight at a time: while it runs, the partition's
next events accumulate, and they leave as one batch when it commits. Batches
therefore grow with the workers' latency, and a partition's batches can never
be applied out of order or concurrently (the commit script also refuses both).

The namespace's committed epoch advances when every epoch up to it is
committed by its partition; the driver then writes those epochs' lines, and
only after that records the new committed epoch and the input offset after
it. A crash loses no committed line, and a restart begins where that record
says, without reading the input before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson
from redis import Redis

from orchestrator.dispatch import Dispatcher, InFlight
from orchestrator.notices import NoticeReader
from orchestrator.output import OutputMerger, write_lines
from orchestrator.progress import Progress
from orchestrator.reader import InputLine
from orchestrator.workers import WorkerPool
from tasks.apply import describe_exception
from tasks.batch import Batch, CommitNotice, OnError, Rejection
from tasks.errors import InvalidEvent
from tasks.flow import load_flow, make_router
from tasks.keys import Keys, partition_of
from tasks.store import applied_epochs

logger = logging.getLogger(__name__)

DEFAULT_BATCH_EVENTS = 5_000  # bounds a job's payload and the time its commit blocks Redis
MAX_BUFFERED_EVENTS = 200_000  # read no further while this many events wait for workers
READ_CHUNK = 2_000  # lines read between two looks at the commit notices
PARTITION_CACHE_SIZE = 1_000_000  # keys whose partition the driver remembers
BLOCK_MS = 200  # how long to wait for a notice when there is nothing else to do
RECORD_EVERY = 0.1  # seconds between two records of the committed epoch


@dataclass(frozen=True)
class BadLine:
    """A line or event rejected by the flow: where it is, what it was and why."""

    epoch: int
    offset: int
    reason: str
    raw: bytes = b""

    @property
    def line_number(self) -> int:
        """1-based line number in the input."""
        return self.epoch + 1


@dataclass
class Pending:
    """Input lines of one partition waiting for a batch: epochs, text and offsets.

    A line is one epoch; it gives one or more events (``events`` counts them).
    """

    epochs: list[int] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    events: int = 0

    def split(self, n: int) -> tuple[Pending, Pending]:
        """The first n lines, and the rest (events shared out in proportion)."""
        first = self.events * n // len(self.epochs)
        return (
            Pending(self.epochs[:n], self.lines[:n], self.offsets[:n], first),
            Pending(self.epochs[n:], self.lines[n:], self.offsets[n:], self.events - first),
        )


@dataclass
class RunResult:
    """How a run ended."""

    committed: int
    next_offset: int  # byte offset of the line after the committed epoch
    events: int = 0
    skipped: list[BadLine] = field(default_factory=list)
    failure: BadLine | None = None
    reruns: int = 0


# Called when the committed epoch advances: (committed epoch, offset of the next line,
# dead letters for epochs up to it).
OnCommit = Callable[[int, int, list[BadLine]], None]


class Driver:
    """Runs one generation of the pipeline over one input file."""

    def __init__(
        self,
        r: Redis,
        keys: Keys,
        *,
        generation: int,
        partitions: int,
        flow_path: str,
        on_error: OnError,
        out: BinaryIO,
        workers: WorkerPool,
        progress: Progress,
        on_commit: OnCommit,
        batch_events: int = DEFAULT_BATCH_EVENTS,
    ) -> None:
        self.r = r
        self.batch_events = batch_events
        self.keys = keys
        self.generation = generation
        self.partitions = partitions
        self.flow_path = flow_path
        before, stateful, _ = load_flow(flow_path).split()
        self.route = make_router(before, stateful)
        self.partition_cache: dict[str, int] = {}
        self.on_error = on_error
        self.out = out
        self.workers = workers
        self.progress = progress
        self.on_commit = on_commit
        self.dispatcher = Dispatcher(r, keys, generation, partitions)
        self.notices = NoticeReader(r, keys.notices(generation))
        self.pending: dict[int, Pending] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.after: list[int] = applied_epochs(r, keys, partitions)
        self.merger = OutputMerger()
        self.buffered = 0
        self.dead: list[BadLine] = []  # dead letters not yet recorded
        self.recorded = -2  # the last committed epoch recorded (none yet)
        self.recorded_at = 0.0

    # ----------------------------------------------------------------- the loop

    def run(self, lines: Iterator[InputLine], start_epoch: int, start_offset: int) -> RunResult:
        """Process the lines to their end, or to the first bad one under ``on_error=fail``."""
        result = RunResult(committed=start_epoch - 1, next_offset=start_offset)
        read_through, read_offset = start_epoch - 1, start_offset
        exhausted = False
        while True:
            if not exhausted and result.failure is None and self.buffered < MAX_BUFFERED_EVENTS:
                exhausted, read_through, read_offset = self._read_chunk(
                    lines, result, read_through, read_offset
                )
            self._dispatch(read_through, result.failure)
            idle = exhausted or result.failure is not None or self.buffered >= MAX_BUFFERED_EVENTS
            for notice in self.notices.read(BLOCK_MS if idle and self.in_flight else None):
                self._on_notice(notice, result)
            self.workers.supervise()
            self.dispatcher.watch(self.in_flight)
            self._advance(result, read_through, read_offset)
            self.progress.update(result.events, result.committed, len(self.in_flight))
            done = exhausted or result.failure is not None
            if done and not self.in_flight and not self.pending:
                self._record(result, force=True)
                result.reruns = self.dispatcher.reruns
                return result

    def _read_chunk(
        self, lines: Iterator[InputLine], result: RunResult, read_through: int, read_offset: int
    ) -> tuple[bool, int, int]:
        """Read up to READ_CHUNK lines: parse, route, buffer per partition.

        Returns (input exhausted, last epoch read, offset after it); a bad line
        under ``fail`` stops the chunk before it. This is the driver's hot loop:
        it keeps to local names and one dict lookup per event.
        """
        route, loads, partition_cache = self.route, orjson.loads, self.partition_cache
        pending_of = self.pending
        count = 0
        for _ in range(READ_CHUNK):
            line = next(lines, None)
            if line is None:
                self.buffered += count
                result.events += count
                return True, read_through, read_offset
            epoch, offset, end, data, oversized = line
            if data.strip():  # blank lines are skipped silently and keep their epoch number
                text = data[:-1] if data[-1:] == b"\n" else data
                try:
                    if oversized:
                        raise InvalidEvent(oversized)
                    events = route(loads(data))
                except Exception as e:  # the input or the flow's code rejected the line
                    self._reject(BadLine(epoch, offset, _reason(e), text), result)
                    if result.failure is not None:
                        break
                    events = []
                for key, _ in events:
                    p = partition_cache.get(key)
                    if p is None:
                        if len(partition_cache) > PARTITION_CACHE_SIZE:
                            partition_cache.clear()
                        p = partition_cache[key] = partition_of(key, self.partitions)
                    pending = pending_of.get(p)
                    if pending is None:
                        pending = pending_of[p] = Pending()
                    if not pending.epochs or pending.epochs[-1] != epoch:
                        pending.epochs.append(epoch)  # the line goes once to each partition
                        pending.lines.append(text)
                        pending.offsets.append(offset)
                    pending.events += 1
                count += len(events)
            read_through, read_offset = epoch, end
        self.buffered += count
        result.events += count
        return False, read_through, read_offset

    def _reject(self, bad: BadLine, result: RunResult) -> None:
        if self.on_error == "fail":
            if result.failure is None or bad.epoch < result.failure.epoch:
                result.failure = bad
                self._forget_from(bad.epoch)
            return
        result.skipped.append(bad)
        if self.on_error == "dead-letter":
            self.dead.append(bad)
        logger.info("left out line %d (epoch %d): %s", bad.line_number, bad.epoch, bad.reason)

    # ------------------------------------------------------------ dispatching

    def _dispatch(self, read_through: int, failure: BadLine | None) -> None:
        """Send a batch to every partition that has events and no batch in flight."""
        last_allowed = read_through if failure is None else min(read_through, failure.epoch - 1)
        flights = []
        for p in sorted(self.pending):
            if p in self.in_flight:
                continue
            pending = self.pending.pop(p)
            if len(pending.epochs) > self.batch_events:
                pending, self.pending[p] = pending.split(self.batch_events)
                last_epoch = self.pending[p].epochs[0] - 1
            else:
                last_epoch = last_allowed
            batch = Batch(
                self.keys.namespace,
                self.generation,
                p,
                self.partitions,
                self.after[p],
                last_epoch,
                self.flow_path,
                self.on_error,
                pending.epochs,
                pending.lines,
            )
            flight = self.dispatcher.new_flight(batch, pending.offsets, pending.events)
            self.in_flight[p] = flight
            flights.append(flight)
        self.dispatcher.send(flights)

    # ------------------------------------------------------------- collecting

    def _on_notice(self, notice: CommitNotice, result: RunResult) -> None:
        p = notice.partition
        flight = self.in_flight.pop(p)
        self.buffered -= flight.events
        self.after[p] = notice.applied_through
        self.merger.add(p, list(zip(notice.epochs, notice.lines, strict=True)))
        for rejection in [*notice.rejected, *([notice.failed] if notice.failed else [])]:
            self._reject(_bad(rejection, flight), result)

    def _forget_from(self, epoch: int) -> None:
        """Drop buffered events and lines at or after ``epoch``: the run stops before it."""
        for p in list(self.pending):
            pending = self.pending[p]
            keep = sum(1 for e in pending.epochs if e < epoch)
            kept = pending.split(keep)[0] if keep else Pending()
            self.buffered -= pending.events - kept.events
            if keep:
                self.pending[p] = kept
            else:
                del self.pending[p]
        self.merger.drop_from(epoch)

    # -------------------------------------------------------------- committing

    def _advance(self, result: RunResult, read_through: int, read_offset: int) -> None:
        """Emit every line up to the namespace-wide committed epoch, then record it."""
        next_epoch, next_offset = read_through + 1, read_offset
        for flight in self.in_flight.values():
            if flight.first_epoch < next_epoch:
                next_epoch, next_offset = flight.first_epoch, flight.offsets[0]
        for pending in self.pending.values():
            if pending.epochs[0] < next_epoch:
                next_epoch, next_offset = pending.epochs[0], pending.offsets[0]
        if result.failure is not None and result.failure.epoch < next_epoch:
            next_epoch, next_offset = result.failure.epoch, result.failure.offset
        committed = next_epoch - 1
        if committed > result.committed:
            write_lines(self.out, self.merger.pop_through(committed))
            result.committed, result.next_offset = committed, next_offset
        self._record(result)

    def _record(self, result: RunResult, *, force: bool = False) -> None:
        """Record the committed epoch (after its lines are written), at most every RECORD_EVERY.

        A crash between writing lines and recording them makes resume print those
        lines again: stdout is at-least-once; recording less often widens that
        window a little and saves a round trip per advance.
        """
        now = time.monotonic()
        if result.committed == self.recorded or (
            not force and now - self.recorded_at < RECORD_EVERY
        ):
            return
        committed = result.committed
        dead = sorted((d for d in self.dead if d.epoch <= committed), key=lambda d: d.epoch)
        self.dead = [d for d in self.dead if d.epoch > committed]
        self.on_commit(committed, result.next_offset, dead)
        self.recorded, self.recorded_at = committed, now


def _reason(e: Exception) -> str:
    if isinstance(e, orjson.JSONDecodeError):
        if "UTF-8" in str(e):
            return "invalid UTF-8"
        return f"invalid JSON: {e}"
    return describe_exception(e)


def _bad(rejection: Rejection, flight: InFlight) -> BadLine:
    i = flight.batch.epochs.index(rejection.epoch)
    return BadLine(rejection.epoch, flight.offsets[i], rejection.reason, flight.batch.lines[i])
