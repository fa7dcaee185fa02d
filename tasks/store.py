"""Load and commit partition state in Redis; restore a partition as of an epoch.

A batch commits in one MULTI/EXEC guarded by WATCH on its partition's
progress hash, which holds how far the partition has applied and which run
(generation) owns it. The worker reads that hash and the states under the
WATCH, applies the batch, and commits: EXEC writes nothing if the hash changed
in between (a copy of the batch committed first, or a newer run claimed the
partition). Restoring goes through one MULTI/EXEC per partition.

Why not a Lua script: a commit carries thousands of fields, and a script
turns each argument into a Lua string and back (Redis's CPU with each: see
docs/performance.md).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis, WatchError
from redis.client import Pipeline

from tasks.apply import AppliedBatch
from tasks.errors import FlowError, Superseded, TornWrite
from tasks.flow import RUN_MAIN_FLOW, Dataflow, load_flow
from tasks.keys import Keys
from tasks.resp import send, takes_packed
from tasks.undo import FlowSource, Raw, first_befores_after, first_epoch, truncate_undo

logger = logging.getLogger(__name__)

NOTHING = -1  # the "applied"/"committed" value of a partition or namespace with nothing yet


class CommitOutcome(enum.Enum):
    """What a commit did with a batch."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"  # the partition had applied this batch already: nothing written
    STALE = "stale"  # a newer driver run owns the partition: nothing written
    OUT_OF_ORDER = "out_of_order"  # the batch before this one is not committed yet: nothing written


# The fields of a partition's progress hash that say who may commit, how far it applied,
# and whether it holds part of a transaction (TORN).
PROGRESS_FIELDS = ["generation", "applied", "torn"]

# Every transaction that writes a partition (or meta) adds 1 to this field of its progress
# hash (of meta) first and takes it back last: whole, it leaves 0; a part of it that Redis
# ran without its end (an append-only file cut inside a MULTI/EXEC block, which Redis 6.2
# and 7 keep at a restart and run at the next one) leaves 1 for good.
TORN = "torn"


def decode_progress(reply: list[Any]) -> tuple[int | None, int]:
    """A partition's (owning generation or None, applied epoch) from HMGET of PROGRESS_FIELDS.

    Raises:
        TornWrite: the partition holds part of a transaction.
    """
    generation, applied, torn = reply
    if torn is not None and int(torn) != 0:
        raise TornWrite(torn_message("a partition's progress"))
    return (
        None if generation is None else int(generation),
        NOTHING if applied is None else int(applied),
    )


def torn_message(where: str) -> str:
    """Why a namespace that holds part of a transaction is refused, and what to do."""
    return (
        f"Redis holds part of a transaction ({where} says so): its append-only file was cut "
        f"inside a MULTI/EXEC block (a crash) and the server restarted twice since, which "
        f"makes Redis run the start of that block; the namespace's state cannot be trusted "
        f"(nothing was written); start over with 'reset', or use a Redis that truncates such "
        f"a file before the block (or rewrite the file with BGREWRITEAOF after a crash)"
    )


@dataclass(frozen=True)
class Loaded:
    """What a worker reads before applying a batch."""

    generation: int | None
    applied: int
    states: dict[str, Raw]


@dataclass(frozen=True)
class CommitTarget:
    """Where a batch commits, and what must hold for it to commit."""

    keys: Keys
    generation: int
    partition: int
    after_epoch: int  # the partition must have applied exactly this far
    last_epoch: int  # names the stored batch (deleted by the commit)
    # The batch runs as an RQ job of a pipeline run: its commit also releases the
    # partition's lease and moves the staged next batch into the RQ queue.
    job: bool = False
    # A part of the batch (its commit bounded by bytes: tasks/jobs.py), with more to come:
    # the stored batch, the lease and the staged next batch stay for the rest.
    part: bool = False


def claim_partition(r: Redis | Pipeline, keys: Keys, partition: int, generation: int) -> None:
    """Make ``generation`` the only run whose batches may commit to the partition.

    Changing the progress hash also fails the EXEC of any commit of an older
    run that is between its WATCH and its EXEC.
    """
    r.hset(keys.progress(partition), "generation", generation)


def outcome_of(target: CommitTarget, generation: int | None, applied: int) -> CommitOutcome | None:
    """Why a batch cannot commit to a partition in this state, or None if it can."""
    if generation != target.generation:
        return CommitOutcome.STALE
    if applied >= target.last_epoch:
        return CommitOutcome.DUPLICATE
    if applied != target.after_epoch:
        return CommitOutcome.OUT_OF_ORDER
    return None


class PartitionTransaction:
    """One batch's read-apply-commit on a partition, on a connection that WATCHes its progress."""

    def __init__(self, r: Redis, pipe: Pipeline, keys: Keys, partition: int) -> None:
        self.r, self.pipe, self.keys, self.partition = r, pipe, keys, partition
        self.fast = takes_packed(r)  # (the HMGET and HSET of a batch's keys: tasks/resp.py)

    def load(self, wanted: list[str]) -> Loaded:
        """Read the partition's owner, progress and the states of ``wanted`` (under the WATCH).

        One round trip on another connection: the WATCH is in place before the
        reads, so a change of the progress after it fails the EXEC, whichever
        connection read it.
        """
        with self.r.pipeline(transaction=False) as reads:
            reads.hmget(self.keys.progress(self.partition), PROGRESS_FIELDS)
            if wanted:
                send(reads, self.fast, "HMGET", self.keys.state(self.partition), *wanted)
            replies = reads.execute()
        states = dict(zip(wanted, replies[1], strict=True)) if wanted else {}
        return Loaded(*decode_progress(replies[0]), states)

    def commit(
        self, target: CommitTarget, applied: AppliedBatch, notice: bytes = b""
    ) -> CommitOutcome:
        """Commit a batch's effects atomically, or nothing if its partition changed since the load.

        The caller has checked the loaded progress against the target. ``notice``
        (if any) is appended to the run's notice stream in the same transaction.
        """
        keys, p, pipe = target.keys, target.partition, self.pipe
        sets: list[Any] = []
        deletes: list[str] = []
        for key, raw in applied.writes.items():
            if raw is None:
                deletes.append(key)
            else:
                sets += (key, raw)
        pipe.multi()
        pipe.hincrby(keys.progress(p), TORN, 1)  # first, and taken back last
        if sets:
            send(pipe, self.fast, "HSET", keys.state(p), *sets)
        if deletes:
            pipe.hdel(keys.state(p), *deletes)
        if applied.undo_epochs:
            pipe.zadd(keys.undo(p), {applied.encode_undo(): applied.applied_through})
        pipe.hset(keys.progress(p), "applied", applied.applied_through)
        if not target.part:
            pipe.delete(keys.batch(target.generation, p, target.last_epoch))
        if target.job and not target.part:
            # No other job can hold the lease yet: the successor starts after this EXEC.
            pipe.delete(keys.lease(p))
            if applied.failed is None:  # a batch stopped by a failure ends the run there
                pipe.lmove(keys.successor(target.generation, p), keys.queue_key(p), "LEFT", "RIGHT")
        if notice:
            pipe.xadd(keys.notices(target.generation, p), {"n": notice})
        pipe.hincrby(keys.progress(p), TORN, -1)
        try:
            pipe.execute()
            outcome = CommitOutcome.COMMITTED
        except WatchError as e:
            # Something changed the partition since the load: say what, from a fresh read.
            progress = decode_progress(self.r.hmget(keys.progress(p), PROGRESS_FIELDS))
            refused = outcome_of(target, *progress)
            # A progress hash that changed and came back to the same values is out of
            # order all the same. (redis-py raises WatchError for a connection lost under
            # WATCH too: then the progress has not changed either; say so, with its words.)
            outcome = CommitOutcome.OUT_OF_ORDER if refused is None else refused
            if refused is None:
                logger.warning(
                    "partition %d epochs %d..%d: the commit wrote nothing, but the partition is "
                    "as it was (%s)",
                    p,
                    target.after_epoch + 1,
                    applied.applied_through,
                    e,
                )
        logger.debug(
            "partition %d epochs %d..%d: %s",
            p,
            target.after_epoch + 1,
            applied.applied_through,
            outcome.name,
        )
        return outcome


@contextmanager
def partition_transaction(r: Redis, keys: Keys, partition: int) -> Iterator[PartitionTransaction]:
    """WATCH the partition's progress for one load, apply and commit."""
    with r.pipeline(transaction=True) as pipe:
        pipe.watch(keys.progress(partition))
        yield PartitionTransaction(r, pipe, keys, partition)


def applied_epochs(r: Redis, keys: Keys, partitions: int) -> list[int]:
    """The epoch through which each partition has applied its events."""
    pipe = r.pipeline(transaction=False)
    for p in range(partitions):
        pipe.hmget(keys.progress(p), PROGRESS_FIELDS)
    return [decode_progress(reply)[1] for reply in pipe.execute()]


def restore_partition(
    r: Redis,
    keys: Keys,
    partition: int,
    epoch: int,
    *,
    generation: int | None = None,
    flow: Dataflow | None = None,
) -> int:
    """Restore a partition's state as it was at the end of ``epoch``.

    Each key touched after ``epoch`` gets the before-image of its first event
    after ``epoch`` (or loses its state if it had none); undo records after
    ``epoch`` are dropped. Call it only while no batch can commit (the caller
    has claimed the partition for a new generation first).

    Args:
        generation: the run restoring it; the restore writes nothing, and raises,
            if the partition belongs to another run by then (a driver that was
            paused here must not undo a newer run's commits).
        flow: the namespace's flow, which re-derives states inside the record
            that straddles ``epoch``; by default the one its meta names, loaded
            only if needed.

    Returns:
        The number of keys restored.

    Raises:
        Superseded: the partition was claimed by another run.
    """
    progress = keys.progress(partition)
    with r.pipeline(transaction=True) as pipe:
        pipe.watch(progress)
        owner, applied = decode_progress(pipe.hmget(progress, PROGRESS_FIELDS))
        if generation is not None and owner != generation:
            raise _superseded(keys, partition, generation, owner)
        if applied <= epoch:
            return 0
        records = cast("list[bytes]", pipe.zrangebyscore(keys.undo(partition), f"({epoch}", "+inf"))
        restore: dict[str, bytes | None] = {}  # key -> the JSON of its state, or None
        source = namespace_flow(r, keys, flow)
        # In epoch order: the earliest event after `epoch` wins for each key.
        for record in records:
            for key, before in first_befores_after(record, epoch, source).items():
                restore.setdefault(key, before)
        # Keep the part up to `epoch` of the records that straddle it: only the oldest in a
        # partition's own chain, any whose keys came from different partitions (a rescale).
        kept = [
            part
            for record in records
            if (first := first_epoch(record)) is not None and first <= epoch
            if (part := truncate_undo(record, epoch)) is not None
        ]
        pipe.multi()
        pipe.hincrby(progress, TORN, 1)  # first, and taken back last
        sets = [x for key, before in restore.items() if before is not None for x in (key, before)]
        deletes = [key for key, before in restore.items() if before is None]
        for i in range(0, len(sets), 2000):
            pipe.hset(keys.state(partition), items=sets[i : i + 2000])
        for i in range(0, len(deletes), 1000):
            pipe.hdel(keys.state(partition), *deletes[i : i + 1000])
        pipe.zremrangebyscore(keys.undo(partition), f"({epoch}", "+inf")
        if kept:
            pipe.zadd(keys.undo(partition), dict.fromkeys(kept, epoch))
        pipe.hset(progress, "applied", epoch)
        pipe.hincrby(progress, TORN, -1)
        try:
            pipe.execute()
        except WatchError:
            raise _superseded(keys, partition, generation, None) from None
    logger.info(
        "partition %d restored to epoch %d (%d keys, was %s)",
        partition,
        epoch,
        len(restore),
        applied,
    )
    return len(restore)


def namespace_flow(r: Redis, keys: Keys, flow: Dataflow | None = None) -> FlowSource:
    """What loads the flow that undo records re-derive states with: ``flow``, or the meta's."""
    if flow is not None:
        return lambda: flow

    def load() -> Dataflow:
        name = r.hget(keys.meta, "flow")
        if name is None:
            msg = f"namespace {keys.namespace!r} names no flow: its undo records cannot be read"
            raise FlowError(msg)
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name.startswith(RUN_MAIN_FLOW):
            msg = (
                f"namespace {keys.namespace!r} was written by run_main: a large state there is "
                f"re-derived by the flow object it ran with, which only that program has "
                f"(run it again from the epoch wanted)"
            )
            raise FlowError(msg)
        return load_flow(name)

    return load


def _superseded(
    keys: Keys, partition: int, generation: int | None, owner: int | None
) -> Superseded:
    now = "changed" if owner is None else f"belongs to generation {owner}"
    msg = (
        f"partition {partition} of namespace {keys.namespace!r} {now} while run "
        f"{generation} was restoring it: another driver took over"
    )
    return Superseded(msg)
