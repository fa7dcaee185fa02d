"""Sending batches to the partition queues, and running again those whose worker died.

A partition has one batch queued or running at a time, and at most one staged
behind it (``stage``). While a batch runs, its worker keeps
the partition's lease alive (``tasks/lease.py``). A batch that is neither
queued, nor leased, nor committed for ``LOST_AFTER`` seconds lost its worker
(killed, or its connection dropped right after it took the job): it is sent
again, at the front of its queue. Running it twice is harmless — the commit
accepts one copy and refuses the other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from orchestrator.errors import WorkerFailed
from orchestrator.fence import Fence, refusal_error
from tasks.batch import Batch
from tasks.errors import PipelineError
from tasks.keys import PARTITION_FOUND_AT, PROCESS_BATCH, Keys, rq_job_key
from tasks.rqcompat import partition_queues
from tasks.scripts import Refusal
from tasks.store import PROGRESS_FIELDS, decode_progress

logger = logging.getLogger(__name__)

# No RQ job timeout: RQ's SimpleWorker enforces one with SIGALRM, the timer that
# stops a hung flow (--batch-timeout, tasks/watchdog.py) uses. RQ (2.x and 3.x)
# arms signal.alarm(-1) for it, i.e. never (RQ takes `job.timeout or DEFAULT_TIMEOUT`;
# its forking Worker treats -1 as "never" explicitly).
JOB_TIMEOUT = -1
BATCH_TTL = 7 * 24 * 3600  # a stored batch outlives any run that could still commit it
FAILED_JOB_TTL = 7 * 24 * 3600
# A finished batch job (and its result) is kept this long, so that RQ's finished registries
# (rq-dashboard's counts) hold the last seconds' batches: ~7 KB each, and a live input at
# 1,000 events/s finishes ~84 batches a second (docs/performance.md).
RESULT_TTL = 10
WATCH_EVERY = 1.0  # seconds between two looks at the batches in flight
LOST_AFTER = 2.0  # seconds a batch may look abandoned before it is sent again


@dataclass
class InFlight:
    """A batch sent to the workers and not yet committed."""

    job_id: str
    batch: Batch
    offsets: list[int]  # of each line of the batch in the input
    events: int  # how many events its lines give
    size: int  # bytes of its lines
    attempt: int = 1
    suspect_since: float | None = None
    sent_at: float = field(default_factory=time.monotonic)
    read_at: float = field(default_factory=time.monotonic)  # when its first line was read
    # A worker commits a batch in parts bounded by bytes (tasks/jobs.py): the epoch the
    # notices of its parts so far reach (its after_epoch before any), the index of its
    # first line after that epoch, and the events counted as committed by those parts.
    through: int = -2
    first_line: int = 0
    counted: int = 0

    @property
    def first_epoch(self) -> int:
        """Epoch of the batch's first line not committed yet."""
        return self.batch.epochs[self.first_line]

    @property
    def committing(self) -> bool:
        """Whether some of its lines are not committed yet (else all that is left of it
        is epochs without lines of its partition)."""
        return self.first_line < len(self.batch.epochs)


class Dispatcher:
    """Enqueues batches as RQ jobs and watches the ones in flight."""

    def __init__(self, r: Redis, keys: Keys, generation: int, partitions: int) -> None:
        self.r = r
        self.keys = keys
        self.generation = generation
        self.queues = partition_queues(r, keys, partitions)
        self.reruns = 0
        self._watched_at = time.monotonic()

    def send(self, flights: list[InFlight], *, at_front: bool = False) -> None:
        """Enqueue the batches, all in one round trip."""
        if not flights:
            return
        pipe = self.r.pipeline(transaction=False)
        for flight in flights:
            b = flight.batch
            batch_key = self.keys.batch(self.generation, b.partition, b.last_epoch)
            # Stored again with every try: a Redis that lost its tail may have lost it too.
            pipe.set(batch_key, b.encode(), ex=BATCH_TTL)
            job = Queue.prepare_data(PROCESS_BATCH, **self._job_options(flight), at_front=at_front)
            self.queues[b.partition].enqueue_many([job], pipeline=pipe)
        pipe.execute()

    def stage(self, flight: InFlight) -> None:
        """Store a partition's next batch and its RQ job, without queueing the job yet.

        The job's id waits in the partition's successor list; the commit of the
        batch running before it moves the id into the RQ queue (so that the next
        batch starts at once, and never before its predecessor committed), and
        ``promote`` does it in case that commit came first.
        """
        b = flight.batch
        batch_key = self.keys.batch(self.generation, b.partition, b.last_epoch)
        job = self.queues[b.partition].create_job(
            PROCESS_BATCH,
            **self._job_options(flight),
            ttl=BATCH_TTL,  # a staged job that is never queued (its run was killed) expires
        )
        job.enqueued_at = datetime.now(UTC)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(batch_key, b.encode(), ex=BATCH_TTL)
        job.save(pipeline=pipe)
        pipe.rpush(self.keys.successor(self.generation, b.partition), flight.job_id)
        pipe.execute()

    def _job_options(self, flight: InFlight) -> dict[str, Any]:
        """What every batch job is: its arguments, id, timeouts and description."""
        b = flight.batch
        batch_key = self.keys.batch(self.generation, b.partition, b.last_epoch)
        return {
            # the attempt: from the second on, the worker runs the batch carefully
            "args": (self.keys.namespace, b.partition, batch_key, flight.attempt),
            "job_id": flight.job_id,
            "timeout": JOB_TIMEOUT,
            "result_ttl": RESULT_TTL,
            "failure_ttl": FAILED_JOB_TTL,
            "description": _describe(b),
        }

    def promote(self, flight: InFlight) -> None:
        """Make sure a staged batch whose predecessor committed is in its RQ queue."""
        p = flight.batch.partition
        self.r.lmove(self.keys.successor(self.generation, p), self.keys.queue_key(p))
        flight.sent_at = time.monotonic()

    def discard(self, flight: InFlight) -> None:
        """Forget a staged batch that will not run (its predecessor stopped the run)."""
        b = flight.batch
        logger.info("dropped the staged batch of partition %d (%s)", b.partition, _describe(b))
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self.keys.successor(self.generation, b.partition))
        pipe.delete(self.keys.batch(self.generation, b.partition, b.last_epoch))
        pipe.delete(rq_job_key(flight.job_id))
        pipe.execute()

    def new_flight(self, batch: Batch, offsets: list[int], events: int, size: int) -> InFlight:
        """The in-flight record of a batch about to be sent."""
        job_id = self.keys.job_id(self.generation, batch.partition, batch.last_epoch)
        return InFlight(job_id, batch, offsets, events, size, through=batch.after_epoch)

    def watch(self, in_flight: dict[int, InFlight]) -> None:
        """Re-send batches whose worker is gone; raise if a job failed in its worker.

        Raises:
            WorkerFailed: a batch job ended FAILED in RQ (an error in the worker,
                not a rejected event: those are committed as rejections).
        """
        now = time.monotonic()
        if not in_flight or now - self._watched_at < WATCH_EVERY:
            return
        self._watched_at = now
        flights = list(in_flight.values())
        pipe = self.r.pipeline(transaction=False)
        for f in flights:
            p = f.batch.partition
            pipe.lpos(self.queues[p].key, f.job_id)
            pipe.get(self.keys.lease(p))
            pipe.hmget(self.keys.progress(p), PROGRESS_FIELDS)
            pipe.hget(rq_job_key(f.job_id), "status")
        pipe.exists(self.keys.meta)
        *replies, meta_exists = pipe.execute()
        if not meta_exists:
            gone = Refusal("gone", -1, "", "")
            raise refusal_error(gone, self.keys, Fence(self.generation, "", 0))
        lost = []
        for i, f in enumerate(flights):
            queued, leased, progress, status = replies[4 * i : 4 * i + 4]
            applied_through = self._check_partition(f, *decode_progress(progress))
            if status == b"failed":
                raise self._failure(f)
            # Committed further than its notices say: the notice is on its way. (Short of its
            # last epoch: a batch stopped by a bad event under fail, or a part of a batch:
            # after a part, a batch whose worker died is sent again all the same.)
            committed = applied_through > f.through
            # (a lease of an older run's job is a worker that was paused and woke up: it
            # will be refused at its commit, and says nothing of this run's batch)
            leased = leased is not None and self._is_job_of(leased, f)
            if queued is not None or leased or committed:
                f.suspect_since = None
            elif f.suspect_since is None:
                f.suspect_since = now
            elif now - f.suspect_since >= LOST_AFTER:
                lost.append(f)
        for f in lost:
            f.attempt += 1
            f.suspect_since = None
            base = self.keys.job_id(self.generation, f.batch.partition, f.batch.last_epoch)
            f.job_id = f"{base}-r{f.attempt}"
            self.reruns += 1
            logger.warning(
                "batch of partition %d (epochs %d..%d) lost its worker; sending it again (try %d)",
                f.batch.partition,
                f.batch.after_epoch + 1,
                f.batch.last_epoch,
                f.attempt,
            )
        self.send(lost, at_front=True)

    def _is_job_of(self, job_id: bytes, flight: InFlight) -> bool:
        """Whether ``job_id`` is a try of the batch in flight (its first or a later one)."""
        b = flight.batch
        base = self.keys.job_id(self.generation, b.partition, b.last_epoch).encode()
        return job_id == base or job_id.startswith(base + b"-r")

    def _check_partition(self, flight: InFlight, owner: int | None, found: int) -> int:
        """How far the partition of a batch in flight has applied; raise if it went back in time
        or changed hands.

        Its batch in flight needs it at ``after_epoch``, which the driver saw it commit (or
        at the end of the batch's last part it saw committed): less means Redis lost an
        acknowledged commit (the batch would then wait forever).
        """
        p, generation = flight.batch.partition, self.generation
        found_owner = -1 if owner is None else owner
        refusal = None
        if found_owner > generation:
            refusal = Refusal("superseded", p, str(found_owner), str(generation))
        elif found_owner < generation:  # the claim of this run is gone
            refusal = Refusal("lost", p, f"generation {found_owner}", f"generation {generation}")
        elif found < flight.through:  # (its after_epoch, or the last of its parts seen)
            refusal = Refusal("lost", p, str(found), str(flight.through))
        if refusal is not None:
            fence = Fence(generation, "", 0)
            raise refusal_error(refusal, self.keys, fence)
        return found

    def _failure(self, flight: InFlight) -> PipelineError:
        """Why a batch job failed: Redis went back in time under it, or a worker failed.

        A batch found its partition short of the epoch this run saw it commit when
        Redis lost that commit, though the partition may since have applied again
        what was lost (batches queued before the loss, restored with it, run again):
        the driver's own look at the progress then finds nothing amiss.
        """
        job = Job.fetch(flight.job_id, connection=self.r, serializer=JSONSerializer)
        found_at = job.meta.get(PARTITION_FOUND_AT)
        if isinstance(found_at, int) and found_at < flight.through:
            lost = Refusal("lost", flight.batch.partition, str(found_at), str(flight.through))
            return refusal_error(lost, self.keys, Fence(self.generation, "", 0))
        latest = job.latest_result()
        detail = (latest.exc_string or "").strip().splitlines() if latest else []
        reason = detail[-1] if detail else "no details"
        return WorkerFailed(f"a worker failed on job {job.id} ({job.description}): {reason}")


def _describe(batch: Batch) -> str:
    return f"partition {batch.partition} epochs {batch.after_epoch + 1}..{batch.last_epoch}"
