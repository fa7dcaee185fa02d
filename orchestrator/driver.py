"""The driver: read epochs, route keyed events to partition queues, collect commits, emit output.

A partition has at most two batches in flight: one sent to its RQ queue, and
the next one staged behind it (once half of --batch-events lines, or LINGER
seconds, have accumulated), which the first one's commit moves into the queue. So a
worker finds the partition's next batch queued the moment the previous one
commits, without waiting for the driver; batches grow with the workers'
latency; and a partition's batches are never applied out of order or
concurrently (the commit also refuses both). Batching adapts to the load: once
the driver has read all there is for now (a followed input, a pipe), a partition
with no batch in flight is sent what was read at once, however little; with a
backlog to read, batches fill up as above.

The namespace's committed epoch advances when every epoch up to it is
committed by its partition; the driver then writes those epochs' lines, and
only after that records the new committed epoch and the input offset after
it. A crash loses no committed line, and a restart begins where that record
says, without reading the input before it.
"""

from __future__ import annotations

import logging
import time
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import itemgetter
from typing import Any, BinaryIO, Protocol

import orjson
from redis import Redis

from orchestrator.dispatch import Dispatcher, InFlight
from orchestrator.interrupts import held_interrupts
from orchestrator.lineblock import BlockReader, LineBlock
from orchestrator.metrics import DriverMetrics
from orchestrator.notices import NoticeReader
from orchestrator.output import OutputMerger, OutputStream, synced_length, write_lines
from orchestrator.progress import Progress, input_size
from orchestrator.reader import LineSource, PipeInput, finish_oversized
from orchestrator.streamsource import StreamInput
from tasks.apply import describe_exception
from tasks.batch import Batch, CommitNotice, OnError, Rejection
from tasks.errors import InvalidEvent
from tasks.flow import load_flow, make_router
from tasks.keys import Keys, partition_of, partition_table
from tasks.store import applied_epochs
from tasks.tuning import enabled

logger = logging.getLogger(__name__)

# Read no further while this many events, or bytes of input, wait for the workers: this
# bounds the driver's memory (figures in docs/performance.md). It is raised to leave room
# for two half-full batches per partition when there are many partitions.
MAX_BUFFERED_EVENTS = 100_000
MAX_BUFFERED_BYTES = 32 << 20
READ_CHUNK = 2_000  # lines read between two looks at the commit notices
BLOCK_MS = 200  # how long to wait for a notice when there is nothing else to do
RECORD_EVERY = 0.1  # seconds between two records of the committed epoch
# Seconds between two records when the committed epoch has not moved: each record is fenced
# (tasks/lua/record_progress.lua), so this is also how soon a driver notices that Redis lost
# data or that another driver took over, whatever it is waiting for.
FENCE_EVERY = 1.0
LINGER = 0.2  # a batch waits for half of --batch-events lines or this many seconds
# A followed input at its end: how often to look for more lines. Half of it is the mean delay
# it adds to a line; an idle followed driver used 4.9% of a core at 5 ms, 1.9% at 20 ms.
FOLLOW_POLL_MS = 5
WAITING_NOTE_AFTER = 2.0  # seconds a batch may wait before the driver says it needs workers


@dataclass(frozen=True)
class BadLine:
    """A line or event rejected by the flow: where it is, what it was and why."""

    epoch: int
    offset: int
    reason: str
    raw: bytes = b""
    # "rejected" (bad input, or the flow raised), "timeout" or "killed" (tasks/batch.py)
    kind: str = "rejected"

    @property
    def line_number(self) -> int:
        """1-based line number in the input."""
        return self.epoch + 1


@dataclass(slots=True)  # (its fields are read and written for every line)
class Pending:
    """Input lines of one partition waiting for a batch: epochs, text and offsets.

    A line is one epoch; it gives one or more events (``events`` counts them).
    A partition's pending lines are a queue of these, each at most one batch long,
    so that sending a batch never copies the lines behind it.
    """

    epochs: list[int] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    events: int = 0
    size: int = 0  # bytes of its lines
    since: float = field(default_factory=time.monotonic)  # when its first line was read

    def before(self, epoch: int) -> Pending:
        """Its lines before ``epoch`` (events shared out in proportion)."""
        n = bisect_left(self.epochs, epoch)
        events = self.events * n // len(self.epochs) if self.epochs else 0
        lines = self.lines[:n]
        return Pending(self.epochs[:n], lines, self.offsets[:n], events, sum(map(len, lines)))


@dataclass
class RunResult:
    """How a run ended."""

    committed: int
    next_offset: int  # byte offset of the line after the committed epoch
    events: int = 0
    skipped: list[BadLine] = field(default_factory=list)
    failure: BadLine | None = None
    reruns: int = 0


# Called when the committed epoch advances, and every FENCE_EVERY seconds: (committed epoch,
# offset of the next line, dead letters for epochs up to it, floors=the epoch through which
# each partition was seen to commit, output_length=length of the output file or None,
# progress=what status shows). It raises if the run is no longer this driver's or Redis lost data.
OnCommit = Callable[..., None]


class Housekeeping(Protocol):
    """What the command that runs the driver does beside it (its worker processes, memory)."""

    def between_reads(self) -> None:
        """Called at every turn of the run loop (several times a second)."""

    def batches_wait(self) -> None:
        """Called when a batch has waited in its queue for a few seconds."""


class Driver:
    """Runs one generation of the pipeline over one input file."""

    def __init__(
        self,
        r: Redis,
        keys: Keys,
        *,
        generation: int,
        partitions: int,
        slots: int,
        flow_path: str,
        on_error: OnError,
        out: BinaryIO,
        housekeeping: Housekeeping,
        progress: Progress,
        on_commit: OnCommit,
        batch_events: int,
        batch_timeout: float,
        output_is_file: bool = False,
        output_stream: OutputStream | None = None,
        metrics: DriverMetrics | None = None,
    ) -> None:
        self.r = r
        self.metrics = metrics  # --metrics-port: counted per batch, published a few times a second
        self.output_stream = output_stream
        self.batch_timeout = batch_timeout
        self.batch_events = batch_events
        self.min_batch_lines = max(1, batch_events // 2)
        # Room for every partition to have a batch in flight and the next one filling up,
        # however many partitions there are.
        self.max_buffered = max(MAX_BUFFERED_EVENTS, 2 * partitions * self.min_batch_lines)
        self.output_is_file = output_is_file
        self.keys = keys
        self.generation = generation
        self.partitions, self.slots = partitions, slots
        self.slot_modulus, self.partition_table = partition_table(partitions, slots)
        self.flow_path = flow_path
        flow = load_flow(flow_path)
        before, stateful, _ = flow.split()
        self.route = make_router(before, stateful)
        # (the ``line-key`` tuning knob switches it off, to measure what it buys)
        self.line_key = flow.line_key.fullmatch if flow.line_key and enabled("line-key") else None
        self.line_key_group = flow.line_key.groupindex["key"] if flow.line_key else 0
        # (the ``line-block`` knob reads line by line, to measure what blocks buy)
        self.blocks = (
            BlockReader(flow.line_key)
            if flow.line_key and self.line_key is not None and enabled("line-block")
            else None
        )
        self.on_error = on_error
        self.out = out
        self.housekeeping = housekeeping
        self.progress = progress
        self.on_commit = on_commit
        self.dispatcher = Dispatcher(r, keys, generation, partitions)
        self.notices = NoticeReader(r, [keys.notices(generation, p) for p in range(partitions)])
        self.pending: dict[int, deque[Pending]] = {}
        self.in_flight: dict[int, InFlight] = {}  # the batch in each partition's queue
        self.staged: dict[int, InFlight] = {}  # the batch behind it
        self.after: list[int] = applied_epochs(r, keys, partitions)
        self.merger = OutputMerger()
        self.buffered = 0  # events read and not yet committed
        self.buffered_bytes = 0  # the bytes of their lines (a line counts once per partition)
        self.dead: list[BadLine] = []  # dead letters not yet recorded
        self.recorded = -2  # the last committed epoch recorded (none yet)
        self.recorded_at = 0.0
        self.started_at = time.monotonic()
        self.read_through = -1
        self.first_epoch = 0  # of the run
        self.committed_events = 0  # events of this run that partitions committed
        # (epoch, offset) of the input's last line when it has no newline: a resume reads it
        # again (it may have been cut mid-write, or be followed by more lines).
        self.open_line: tuple[int, int] | None = None
        self.result: RunResult | None = None  # of the run going on
        self._writing = False  # lines are being written, or the committed epoch recorded

    # ----------------------------------------------------------------- the loop

    def run(self, source: LineSource) -> RunResult:
        """Process the input to its end, or to the first bad line under ``on_error=fail``.

        A followed input has no end: the run waits for more lines (sending on at once
        what it read, committing and recording as usual) until the file is truncated or
        replaced (``source.stopped`` then says how), or the command is interrupted.
        """
        result = self.result = RunResult(committed=source.epoch - 1, next_offset=source.offset)
        self.progress.start(source.offset, input_size(source.file, source.follow))
        self.first_epoch = source.epoch
        waiting = ended = False  # no whole line to read now; no more lines ever
        while True:
            if not ended and result.failure is None and not self._full():
                waiting = self._read_chunk(source, result)
                ended = waiting and source.finished()
            read_through, read_offset = source.epoch - 1, source.offset
            self.read_through = read_through
            stopping = result.failure is not None
            self._dispatch(read_through, result.failure, flush=ended or stopping, caught_up=waiting)
            idle = waiting or stopping or self._full()
            block = BLOCK_MS if idle and self.in_flight else None
            if waiting and not ended:
                # Lines may arrive any moment: look for them again soon.
                if self.in_flight:
                    block = FOLLOW_POLL_MS
                else:
                    time.sleep(FOLLOW_POLL_MS / 1000)
            for notice in self.notices.read(block):
                self._on_notice(notice, result)
            self.housekeeping.between_reads()
            self.dispatcher.watch(self.in_flight)
            self._note_missing_workers()
            self._advance(result, read_through, read_offset)
            self.progress.update(
                read=result.events,
                # (lines of partitions that ran ahead wait in the merger: not committed yet)
                committed=result.events - self.buffered - self.merger.held,
                committed_epoch=result.committed,
                committed_offset=result.next_offset,
                in_flight=len(self.in_flight) + len(self.staged),
            )
            if self.metrics is not None and self.metrics.due():
                self._publish(self.metrics, result)
            done = ended or result.failure is not None
            if done and not self.in_flight and not self.staged and not self.pending:
                # Nothing may stay counted as buffered, or a long run would stop reading.
                assert self.buffered == 0 and self.buffered_bytes == 0, (
                    self.buffered,
                    self.buffered_bytes,
                )
                self._record(result, force=True)
                self.notices.close()
                result.reruns = self.dispatcher.reruns
                if self.metrics is not None:
                    self._publish(self.metrics, result)
                return result

    def record_interrupted(self) -> None:
        """After an interrupt (Ctrl-C, SIGTERM): record what is committed, unless writing lines
        or recording them failed (the interrupt cut a record that waited for a lost Redis):
        the last record then stands."""
        if self.result is not None and not self._writing:
            self._record(self.result, force=True)

    def _read_chunk(self, source: LineSource, result: RunResult) -> bool:
        """Read up to READ_CHUNK lines: parse, route, buffer per partition.

        Returns whether the input is exhausted; a bad line under ``fail`` stops the
        chunk before it. This is the driver's hot loop: a file's lines of the flow's
        declared layout are read a block at a time (``orchestrator/lineblock.py``);
        any other line with the file's own ``readline``, keeping to local names and
        one dict lookup per event.
        """
        if self.blocks is not None and not isinstance(source.file, PipeInput | StreamInput):
            block = self.blocks.read(source.file, source.offset, source.max_line_bytes)
            if block is not None:
                self._buffer_block(block, source, result)
                return block.at_end  # (as a read line by line finds the end at the next line)
        modulus, table = self.slot_modulus, self.partition_table
        pending_of, readline, limit = self.pending, source.file.readline, source.max_line_bytes
        batch_lines, crc32 = self.batch_events, zlib.crc32
        fast, key_group = self.line_key, self.line_key_group
        epoch, offset = source.epoch, source.offset  # of the next line
        count = nbytes = 0
        exhausted = False
        for _ in range(READ_CHUNK):
            data = readline(limit + 1)
            if not data:
                exhausted = True
                break
            size, oversized = len(data), None
            if data[-1] == 10:  # a whole line (10: the newline's byte)
                text = data[:-1]
            else:  # over the limit, or the last line (or both)
                whole = self._unterminated(source, data, limit, epoch, offset)
                if whole is None:  # followed: the rest of the line has not arrived yet
                    exhausted = True
                    break
                data, size, oversized = whole
                text = data[:-1] if data[-1:] == b"\n" else data
            match = fast(text) if fast is not None and oversized is None else None
            if match is not None:
                # The flow's declared layout (Dataflow.key_lines_by): one valid event, keyed
                # by a group of the line's bytes, whose crc32 gives the key's partition.
                p = table[crc32(match[key_group]) % modulus]
                queue = pending_of.get(p)
                if queue is None:
                    queue = pending_of[p] = deque([Pending()])
                pending = queue[-1]
                if len(pending.epochs) >= batch_lines:  # full: start the next batch
                    pending = Pending()
                    queue.append(pending)
                pending.epochs.append(epoch)
                pending.lines.append(text)
                pending.offsets.append(offset)
                pending.size += size
                pending.events += 1
                count += 1
                nbytes += size
            elif data.strip():  # blank lines are skipped silently and keep their epoch number
                buffered = self._buffer_line(data, text, oversized, epoch, offset, result)
                if buffered is None:  # a bad line under fail: the run stops before it
                    break
                count += buffered[0]
                nbytes += buffered[1]
            epoch += 1
            offset += size
        self.buffered += count
        self.buffered_bytes += nbytes
        source.epoch, source.offset = epoch, offset
        result.events += count
        return exhausted

    def _buffer_block(self, block: LineBlock, source: LineSource, result: RunResult) -> None:
        """Buffer a block of lines of the declared layout: each one event, routed by its key.

        What the line-by-line loop does for each of them, a partition's lines at a time.
        """
        table, modulus, crc32 = self.partition_table, self.slot_modulus, zlib.crc32
        lines, n = block.lines, len(block.lines)
        parts = [table[crc32(key) % modulus] for key in block.keys]
        sizes = [len(line) + 1 for line in lines]
        offsets = list(accumulate(sizes, initial=source.offset))
        # (a list: itemgetter of a range makes each int anew, 36 ns a line against 18)
        epochs = list(range(source.epoch, source.epoch + n))
        # Each partition's lines in input order: a stable sort of the line indexes by partition.
        order = sorted(range(n), key=parts.__getitem__)
        start = 0
        for p, count in sorted(Counter(parts).items()):
            picked = order[start : start + count]
            start += count
            take = itemgetter(*picked) if count > 1 else _one(picked[0])
            self._buffer_run(p, take(epochs), take(lines), take(offsets), take(sizes))
        self.buffered += n
        self.buffered_bytes += block.size
        source.epoch, source.offset = source.epoch + n, source.offset + block.size
        result.events += n

    def _buffer_run(
        self,
        p: int,
        epochs: tuple[int, ...],
        lines: tuple[bytes, ...],
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
    ) -> None:
        """Add a partition's lines (one event each) to its pending batches, in order."""
        queue = self.pending.get(p)
        if queue is None:
            queue = self.pending[p] = deque([Pending()])
        start, n = 0, len(lines)
        while start < n:
            pending = queue[-1]
            if len(pending.epochs) >= self.batch_events:  # full: start the next batch
                pending = Pending()
                queue.append(pending)
            end = min(n, start + self.batch_events - len(pending.epochs))
            pending.epochs.extend(epochs[start:end])
            pending.lines.extend(lines[start:end])
            pending.offsets.extend(offsets[start:end])
            pending.size += sum(sizes[start:end])
            pending.events += end - start
            start = end

    def _buffer_line(
        self,
        data: bytes,
        text: bytes,
        oversized: str | None,
        epoch: int,
        offset: int,
        result: RunResult,
    ) -> tuple[int, int] | None:
        """Parse a line, run the flow's first steps on it and buffer it for the partition of
        each of its events: (events, bytes buffered), or None if the run stops before it."""
        try:
            if oversized:
                raise InvalidEvent(oversized)
            events = self.route(orjson.loads(data))
        except Exception as e:  # the input or the flow's code rejected the line
            if self._stops_at(BadLine(epoch, offset, _reason(e), text), result):
                return None
            return 0, 0
        size, nbytes = len(data), 0
        for key, _ in events:
            # crc32 each time: a cache of keys would pin memory arenas full of
            # garbage all over the run (the driver's RSS grew with the input)
            p = partition_of(key, self.partitions, self.slots)
            queue = self.pending.get(p)
            if queue is None:
                queue = self.pending[p] = deque([Pending()])
            pending = queue[-1]
            if not pending.epochs or pending.epochs[-1] != epoch:
                if len(pending.epochs) >= self.batch_events:  # full: start the next batch
                    pending = Pending()
                    queue.append(pending)
                pending.epochs.append(epoch)  # the line goes once to each partition
                pending.lines.append(text)
                pending.offsets.append(offset)
                pending.size += size
                nbytes += size
            pending.events += 1
        return len(events), nbytes

    def _unterminated(
        self, source: LineSource, data: bytes, limit: int, epoch: int, offset: int
    ) -> tuple[bytes, int, str | None] | None:
        """A line read without its newline: (its bytes, its size, why it is oversized or None).

        Over the limit, the rest of the line is skipped. If the file ends before a newline,
        this is its last line, perhaps still being written (oversized or not): a resume
        reads it again from its start. A followed file waits for the newline instead: None,
        and the line is read again from its start later.
        """
        size, oversized, ended = len(data), None, False
        if (rejected := source.rejection()) is not None:  # a stream entry without an event
            oversized, ended = rejected, True
        elif size > limit:
            data, size, oversized, ended = finish_oversized(source.file, data, limit)
        if not ended:
            if source.waits:
                source.wait_at(offset, data)
                return None
            self.open_line = (epoch, offset)
        return data, size, oversized

    def _full(self) -> bool:
        # Lines of partitions that ran ahead wait in the merger for a slower one: they count.
        held = self.buffered + self.merger.held
        return held >= self.max_buffered or self.buffered_bytes >= MAX_BUFFERED_BYTES

    def _progress(self, result: RunResult, now: float) -> dict[str, object]:
        """What ``status`` shows of a running driver: read position, rate, backlog."""
        backlog: dict[int, int] = {}
        for p, queue in self.pending.items():
            backlog[p] = sum(x.events for x in queue)
        for flight in [*self.in_flight.values(), *self.staged.values()]:
            p = flight.batch.partition
            backlog[p] = backlog.get(p, 0) + flight.events - flight.counted
        elapsed = max(now - self.started_at, 1e-6)
        return {
            "read_epoch": self.read_through,
            "events_per_s": round(result.events / elapsed, 1),
            "committed_events": self.committed_events,
            "committed_events_per_s": round(self.committed_events / elapsed, 1),
            "run_first_epoch": self.first_epoch,
            "backlog": {p: n for p, n in backlog.items() if n},
        }

    def open_line_through(self, committed: int) -> tuple[int, int] | None:
        """The unterminated last line, if it is committed: the resume point is then its start."""
        if self.open_line is not None and self.open_line[0] <= committed:
            return self.open_line
        return None

    def output_length(self) -> int | None:
        """The output file's length, synced to disk (None for a stream such as stdout).

        Recorded with the committed epoch: what the file holds up to there survives a
        crash, and a resume truncates whatever was written after it.
        """
        if not self.output_is_file:
            return None
        return synced_length(self.out)  # raises (and nothing is recorded) if the disk fails

    def _note_missing_workers(self) -> None:
        """Say (once) that batches wait for workers, when none came in a few seconds."""
        now = time.monotonic()
        if any(now - f.sent_at > WAITING_NOTE_AFTER for f in self.in_flight.values()):
            self.housekeeping.batches_wait()

    def _stops_at(self, bad: BadLine, result: RunResult) -> bool:
        """Reject a line read by the driver; whether the run stops there (``fail``)."""
        self._reject(bad, result)
        return result.failure is not None

    def _reject(self, bad: BadLine, result: RunResult) -> None:
        if self.metrics is not None:
            self.metrics.bad_line(bad.reason, bad.kind)
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

    def _dispatch(
        self, read_through: int, failure: BadLine | None, *, flush: bool, caught_up: bool
    ) -> None:
        """Send a batch to every partition that has events and a free place in flight.

        A partition's first batch goes to its queue, the next one is staged behind
        it. A batch waits to fill up (half of ``batch_events`` lines, or LINGER
        seconds since its first line): every job has a fixed cost (over the worker,
        the driver and Redis), so small batches cost more per event. Except: nothing
        more will be read (``flush``); or the driver has read all there is for now
        (``caught_up``) and the partition has no batch in flight, so nothing is gained
        by waiting (the lines that come while this batch runs make the next one).
        """
        last_allowed = read_through if failure is None else min(read_through, failure.epoch - 1)
        sent = []
        now = time.monotonic()
        for p in sorted(self.pending):
            head = self.in_flight.get(p)
            if head is not None and p in self.staged:
                continue
            queue = self.pending[p]
            first = queue[0]
            if (
                not flush
                and not (caught_up and head is None)
                and len(queue) == 1
                and len(first.epochs) < self.min_batch_lines
                and now - first.since < LINGER
            ):
                continue
            pending = queue.popleft()
            if queue:
                last_epoch = queue[0].epochs[0] - 1
            else:
                del self.pending[p]
                last_epoch = last_allowed
            after = self.after[p] if head is None else head.batch.last_epoch
            batch = Batch(
                self.keys.namespace,
                self.generation,
                p,
                self.partitions,
                after,
                last_epoch,
                self.flow_path,
                self.on_error,
                pending.epochs,
                pending.lines,
                self.batch_timeout,
                self.slots,
            )
            flight = self.dispatcher.new_flight(
                batch, pending.offsets, pending.events, pending.size
            )
            flight.read_at = pending.since
            if self.metrics is not None:
                self.metrics.batch_events.observe(pending.events, self.metrics.ns)
                self.metrics.batches_sent.inc(1, self.metrics.ns)
            if head is None:
                self.in_flight[p] = flight
                sent.append(flight)
            else:
                self.staged[p] = flight
                self.dispatcher.stage(flight)
        self.dispatcher.send(sent)

    # ------------------------------------------------------------- collecting

    def _on_notice(self, notice: CommitNotice, result: RunResult) -> None:
        p = notice.partition
        flight = self.in_flight.get(p)
        if flight is None:
            # A second copy of a batch that failed at its first event: the progress did
            # not move, so both copies committed the same failure. Taken once already.
            return
        if notice.failed is None and notice.applied_through < flight.batch.last_epoch:
            self._on_part(flight, notice, result)
            return
        del self.in_flight[p]
        self.buffered -= flight.events
        self.buffered_bytes -= flight.size
        self.after[p] = notice.applied_through
        events, epochs = flight.events, flight.batch.epochs
        if notice.applied_through < flight.batch.last_epoch:  # stopped by a bad event (fail)
            events = events * bisect_right(epochs, notice.applied_through) // len(epochs)
        events -= flight.counted  # (counted with the notices of its parts)
        self.committed_events += events
        if self.metrics is not None:
            self._count_commit(self.metrics, flight, events)
        successor = self.staged.pop(p, None)
        if successor is not None and notice.failed is None:
            self.in_flight[p] = successor
            self.dispatcher.promote(successor)
        elif successor is not None:  # the run stops in this batch: the next one never runs
            self.buffered -= successor.events
            self.buffered_bytes -= successor.size
            self.dispatcher.discard(successor)
        self.merger.add(p, notice.epochs, notice.lines)
        for rejection in [*notice.rejected, *([notice.failed] if notice.failed else [])]:
            self._reject(_bad(rejection, flight), result)

    def _on_part(self, flight: InFlight, notice: CommitNotice, result: RunResult) -> None:
        """A part of a batch committed (a worker's commits are bounded by bytes): its lines
        go out like any other, and the batch goes on. Its lines and events stay counted as
        buffered until its last part."""
        p, through, epochs = notice.partition, notice.applied_through, flight.batch.epochs
        flight.through, flight.first_line = through, bisect_right(epochs, through)
        self.after[p] = through
        events = flight.events * flight.first_line // len(epochs) - flight.counted
        flight.counted += events
        self.committed_events += events
        if self.metrics is not None:
            self.metrics.events_committed.inc(events, self.metrics.ns)
        self.merger.add(p, notice.epochs, notice.lines)
        for rejection in notice.rejected:
            self._reject(_bad(rejection, flight), result)

    def _publish(self, m: DriverMetrics, result: RunResult) -> None:
        """Hand the run's counts and lag to its metrics (from the loop, a few times a second)."""
        flights = [*self.in_flight.values(), *self.staged.values()]
        read_at = [f.read_at for f in flights] + [q[0].since for q in self.pending.values() if q]
        m.publish(
            committed=result.committed,
            read_epoch=self.read_through,
            events_read=result.events,
            lines_read=self.read_through - self.first_epoch + 1,
            lag_events=self.buffered,
            oldest_read_at=min(read_at, default=None),
            in_flight=len(flights),
            resent=self.dispatcher.reruns,
        )

    def _count_commit(self, m: DriverMetrics, flight: InFlight, events: int) -> None:
        m.events_committed.inc(events, m.ns)
        m.batches_committed.inc(1, m.ns)
        m.batch_seconds.observe(time.monotonic() - flight.sent_at, m.ns)

    def _forget_from(self, epoch: int) -> None:
        """Drop buffered events and lines at or after ``epoch``: the run stops before it."""
        for p in list(self.pending):
            kept = [pending.before(epoch) for pending in self.pending[p]]
            self.buffered -= sum(x.events for x in self.pending[p]) - sum(x.events for x in kept)
            self.buffered_bytes -= sum(x.size for x in self.pending[p]) - sum(x.size for x in kept)
            kept = [x for x in kept if x.epochs]
            if kept:
                self.pending[p] = deque(kept)
            else:
                del self.pending[p]
        self.merger.drop_from(epoch)

    # -------------------------------------------------------------- committing

    def _advance(self, result: RunResult, read_through: int, read_offset: int) -> None:
        """Emit every line up to the namespace-wide committed epoch, then record it."""
        next_epoch, next_offset = read_through + 1, read_offset
        for flight in [*self.in_flight.values(), *self.staged.values()]:
            # (a batch committed in parts: its first line not committed yet, if any)
            if flight.committing and flight.first_epoch < next_epoch:
                next_epoch, next_offset = flight.first_epoch, flight.offsets[flight.first_line]
        for queue in self.pending.values():
            if queue[0].epochs[0] < next_epoch:
                next_epoch, next_offset = queue[0].epochs[0], queue[0].offsets[0]
        if result.failure is not None and result.failure.epoch < next_epoch:
            next_epoch, next_offset = result.failure.epoch, result.failure.offset
        committed = next_epoch - 1
        # An interrupt waits for the lines and their record: the interrupted run records them.
        with held_interrupts():
            if committed > result.committed:
                self._writing = True  # a failure now leaves the record as it was
                lines = self.merger.pop_through(committed)
                if self.output_stream is not None:
                    # held for the next record, whose script adds them to the stream (exactly once)
                    self.output_stream.add(lines)
                else:
                    write_lines(self.out, lines)
                result.committed, result.next_offset = committed, next_offset
                self._writing = False
            self._record(result)

    def _record(self, result: RunResult, *, force: bool = False) -> None:
        """Record the committed epoch (after its lines are written), at most every RECORD_EVERY.

        A crash between writing lines and recording them makes resume print those
        lines again: stdout is at-least-once; recording less often widens that
        window a little and saves a round trip per advance.
        """
        now = time.monotonic()
        since = now - self.recorded_at
        if not force and (
            since < RECORD_EVERY or (result.committed == self.recorded and since < FENCE_EVERY)
        ):
            return
        committed = result.committed
        with held_interrupts():
            self._writing = True
            dead = sorted((d for d in self.dead if d.epoch <= committed), key=lambda d: d.epoch)
            self.dead = [d for d in self.dead if d.epoch > committed]
            self.on_commit(
                committed,
                result.next_offset,
                dead,
                floors=list(self.after),
                output_length=self.output_length(),
                progress=self._progress(result, now),
                open_line=self.open_line_through(committed),
            )
            self._writing = False
        if self.metrics is not None:
            self.metrics.commit_seconds.observe(time.monotonic() - now, self.metrics.ns)
            self.metrics.dead_letters.inc(len(dead), self.metrics.ns)
        self.recorded, self.recorded_at = committed, now


def _one(index: int) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``itemgetter`` of one index, giving a tuple as ``itemgetter`` of several does."""
    return lambda items: (items[index],)


def _reason(e: Exception) -> str:
    if isinstance(e, orjson.JSONDecodeError):
        if "UTF-8" in str(e):
            return "invalid UTF-8"
        # In words of our own, from where the parser stopped: orjson's wording differs
        # between its versions ("unexpected character" became "..., expected a JSON value").
        doc = e.doc or ""
        if e.pos >= len(doc.rstrip()):
            return "invalid JSON: the line ends inside a JSON value"
        return f"invalid JSON: unexpected {doc[e.pos]!r} at column {e.pos + 1}"
    return describe_exception(e)


def _bad(rejection: Rejection, flight: InFlight) -> BadLine:
    i = flight.batch.epochs.index(rejection.epoch)
    return BadLine(
        rejection.epoch, flight.offsets[i], rejection.reason, flight.batch.lines[i], rejection.kind
    )
