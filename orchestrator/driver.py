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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from orchestrator.output import OutputMerger, write_lines
from orchestrator.progress import Progress
from orchestrator.reader import InputLine
from orchestrator.workers import WorkerPool
from tasks.apply import describe_exception
from tasks.batch import Batch, CommitNotice, OnError, Rejection
from tasks.errors import PipelineError
from tasks.flow import keyed, load_flow, run_steps
from tasks.keys import PROCESS_BATCH, Keys, partition_of
from tasks.store import applied_epochs

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 5_000  # bounds a job's payload and the time its commit blocks Redis
MAX_BUFFERED_EVENTS = 200_000  # read no further while this many events wait for workers
READ_CHUNK = 2_000  # lines read between two looks at the commit notices
STATUS_CHECK_SECONDS = 2.0  # how long without a commit before the driver inspects its jobs
JOB_TIMEOUT = 600
FAILED_JOB_TTL = 7 * 24 * 3600


class WorkerFailed(PipelineError):
    """Raised when a batch job failed in a worker for a reason other than the input."""


@dataclass(frozen=True)
class BadLine:
    """A line or event rejected by the flow: where it is and why."""

    epoch: int
    offset: int
    reason: str

    @property
    def line_number(self) -> int:
        """1-based line number in the input."""
        return self.epoch + 1


@dataclass
class Pending:
    """Events of one partition waiting for a batch: epochs, input offsets, keys and values."""

    events: list[tuple[int, str, Any]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class InFlight:
    """A batch sent to the workers and not yet committed."""

    job_id: str
    batch: Batch
    offsets: list[int]
    sent_at: float

    @property
    def first_epoch(self) -> int:
        """Epoch of the batch's first event."""
        return self.batch.events[0][0]


@dataclass
class RunResult:
    """How a run ended."""

    committed: int
    events: int = 0
    skipped: list[BadLine] = field(default_factory=list)
    failure: BadLine | None = None


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
        out: TextIO,
        workers: WorkerPool,
        progress: Progress,
        on_commit: Any,
    ) -> None:
        self.r = r
        self.keys = keys
        self.generation = generation
        self.partitions = partitions
        self.flow_path = flow_path
        self.before_steps, self.stateful, _ = load_flow(flow_path).split()
        self.on_error = on_error
        self.out = out
        self.workers = workers
        self.progress = progress
        self.on_commit = on_commit  # callable(committed_epoch, next_offset)
        self.queues = [
            Queue(name, connection=r, serializer=JSONSerializer)
            for name in keys.queue_names(partitions)
        ]
        self.pending: dict[int, Pending] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.after: list[int] = applied_epochs(r, keys, partitions)
        self.merger = OutputMerger()
        self.buffered = 0

    # ----------------------------------------------------------------- the loop

    def run(self, lines: Iterator[InputLine], start_epoch: int, start_offset: int) -> RunResult:
        """Process the lines to their end, or to the first bad one under ``on_error=fail``."""
        result = RunResult(committed=start_epoch - 1)
        read_through, read_offset = start_epoch - 1, start_offset
        exhausted = False
        last_commit_at = time.monotonic()
        while True:
            if not exhausted and result.failure is None and self.buffered < MAX_BUFFERED_EVENTS:
                for _ in range(READ_CHUNK):
                    line = next(lines, None)
                    if line is None:
                        exhausted = True
                        break
                    self._read(line, result)
                    if result.failure is not None:
                        break
                    read_through, read_offset = line.epoch, line.end
            self._dispatch(read_through, result.failure)
            idle = exhausted or result.failure is not None or self.buffered >= MAX_BUFFERED_EVENTS
            if self._collect(result, block=idle and bool(self.in_flight)):
                last_commit_at = time.monotonic()
            elif self.in_flight and time.monotonic() - last_commit_at > STATUS_CHECK_SECONDS:
                self._check_jobs()
                last_commit_at = time.monotonic()
            self._advance(result, read_through, read_offset)
            self.progress.update(result.events, result.committed, len(self.in_flight))
            done = exhausted or result.failure is not None
            if done and not self.in_flight and not self.pending:
                return result

    def _read(self, line: InputLine, result: RunResult) -> None:
        """Parse one line, run the flow's steps before the stateful one, buffer its events."""
        if not line.data.strip():
            return  # blank lines are skipped silently and keep their epoch number
        try:
            items = run_steps(self.before_steps, orjson.loads(line.data))
            events = [keyed(self.stateful, item) for item in items]
        except Exception as e:  # the input or the flow's code rejected the line
            self._reject(BadLine(line.epoch, line.offset, _reason(e)), result)
            return
        for key, value in events:
            p = partition_of(key, self.partitions)
            pending = self.pending.setdefault(p, Pending())
            pending.events.append((line.epoch, key, value))
            pending.offsets.append(line.offset)
        self.buffered += len(events)
        result.events += len(events)

    def _reject(self, bad: BadLine, result: RunResult) -> None:
        if self.on_error == "skip":
            result.skipped.append(bad)
            logger.info("skipped line %d (epoch %d): %s", bad.line_number, bad.epoch, bad.reason)
        elif result.failure is None or bad.epoch < result.failure.epoch:
            result.failure = bad
            self._forget_from(bad.epoch)

    # ------------------------------------------------------------ dispatching

    def _dispatch(self, read_through: int, failure: BadLine | None) -> None:
        """Send a batch to every partition that has events and no batch in flight."""
        last_allowed = read_through if failure is None else min(read_through, failure.epoch - 1)
        pipe = self.r.pipeline(transaction=False)
        sent = 0
        for p in sorted(self.pending):
            if p in self.in_flight:
                continue
            pending = self.pending.pop(p)
            n = min(len(pending.events), MAX_BATCH_EVENTS)
            if n < len(pending.events):
                # Several events can share an epoch (flat_map): never split one across batches.
                while (
                    0 < n < len(pending.events) and pending.events[n][0] == pending.events[n - 1][0]
                ):
                    n -= 1
                n = n or len(pending.events)
            if n < len(pending.events):
                self.pending[p] = Pending(pending.events[n:], pending.offsets[n:])
                last_epoch = pending.events[n][0] - 1
            else:
                last_epoch = last_allowed
            batch = Batch(
                self.keys.namespace,
                self.generation,
                p,
                self.after[p],
                last_epoch,
                self.flow_path,
                self.on_error,
                pending.events[:n],
            )
            job_id = self.keys.job_id(self.generation, p, last_epoch)
            self.in_flight[p] = InFlight(job_id, batch, pending.offsets[:n], time.monotonic())
            job = Queue.prepare_data(
                PROCESS_BATCH,
                args=(batch.encode(),),
                job_id=job_id,
                timeout=JOB_TIMEOUT,
                result_ttl=0,
                failure_ttl=FAILED_JOB_TTL,
                description=f"partition {p} epochs {batch.after_epoch + 1}..{last_epoch}",
            )
            self.queues[p].enqueue_many([job], pipeline=pipe)
            sent += 1
        if sent:
            pipe.execute()

    # ------------------------------------------------------------- collecting

    def _collect(self, result: RunResult, *, block: bool) -> bool:
        """Take the commit notices waiting for the driver; wait a little if ``block``."""
        key = self.keys.notices(self.generation)
        raw = self.r.lpop(key, 1000)
        if not raw and block:
            popped = self.r.blpop([key], timeout=0.5)
            raw = [popped[1]] if popped else []
        for data in raw or []:
            self._on_notice(CommitNotice.decode(data), result)
        if not raw:
            self.workers.check_alive()
        return bool(raw)

    def _on_notice(self, notice: CommitNotice, result: RunResult) -> None:
        p = notice.partition
        flight = self.in_flight.pop(p)
        self.buffered -= len(flight.batch.events)
        self.after[p] = notice.applied_through
        self.merger.add(p, notice.lines)
        offsets = dict(zip((e for e, _, _ in flight.batch.events), flight.offsets, strict=True))
        for rejection in notice.rejected:
            self._reject(_bad(rejection, offsets), result)
        if notice.failed is not None:
            self._reject(_bad(notice.failed, offsets), result)

    def _forget_from(self, epoch: int) -> None:
        """Drop buffered events and lines at or after ``epoch``: the run stops before it."""
        for p in list(self.pending):
            pending = self.pending[p]
            keep = sum(1 for e, _, _ in pending.events if e < epoch)
            self.buffered -= len(pending.events) - keep
            if keep:
                self.pending[p] = Pending(pending.events[:keep], pending.offsets[:keep])
            else:
                del self.pending[p]
        self.merger.drop_from(epoch)

    def _check_jobs(self) -> None:
        """Look for batch jobs that failed in a worker (not for input reasons)."""
        ids = [f.job_id for f in self.in_flight.values()]
        for job in Job.fetch_many(ids, connection=self.r, serializer=JSONSerializer):
            if job is None or job.get_status(refresh=False) != JobStatus.FAILED:
                continue
            latest = job.latest_result()
            detail = (latest.exc_string or "").strip().splitlines() if latest else []
            reason = detail[-1] if detail else "no details"
            msg = f"a worker failed on job {job.id} ({job.description}): {reason}"
            raise WorkerFailed(msg)

    # -------------------------------------------------------------- committing

    def _advance(self, result: RunResult, read_through: int, read_offset: int) -> None:
        """Emit every line up to the namespace-wide committed epoch, then record it."""
        next_epoch, next_offset = read_through + 1, read_offset
        for flight in self.in_flight.values():
            if flight.first_epoch < next_epoch:
                next_epoch, next_offset = flight.first_epoch, flight.offsets[0]
        for pending in self.pending.values():
            if pending.events[0][0] < next_epoch:
                next_epoch, next_offset = pending.events[0][0], pending.offsets[0]
        if result.failure is not None and result.failure.epoch < next_epoch:
            next_epoch, next_offset = result.failure.epoch, result.failure.offset
        committed = next_epoch - 1
        if committed <= result.committed:
            return
        write_lines(self.out, self.merger.pop_through(committed))
        self.on_commit(committed, next_offset)
        result.committed = committed


def _reason(e: Exception) -> str:
    if isinstance(e, orjson.JSONDecodeError):
        return f"invalid JSON: {e}"
    return describe_exception(e)


def _bad(rejection: Rejection, offsets: dict[int, int]) -> BadLine:
    return BadLine(rejection.epoch, offsets[rejection.epoch], rejection.reason)
