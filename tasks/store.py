"""Load and commit partition state in Redis; restore a partition as of an epoch.

Every write that makes a batch's effects visible goes through one atomic call
(``commit_batch.lua``); restoring goes through one MULTI/EXEC per partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from redis import Redis

from tasks.apply import AppliedBatch, Raw, encode_undo
from tasks.keys import Keys
from tasks.scripts import CommitOutcome, commit_batch

logger = logging.getLogger(__name__)

NOTHING = -1  # the "applied"/"committed" value of a partition or namespace with nothing yet


@dataclass(frozen=True)
class Loaded:
    """What a worker reads before applying a batch: one round trip."""

    generation: int | None
    applied: int
    states: dict[str, Raw]


def load(r: Redis, keys: Keys, partition: int, wanted: list[str]) -> Loaded:
    """Read the namespace generation, the partition's progress and the states of ``wanted``."""
    pipe = r.pipeline(transaction=False)
    pipe.hget(keys.meta, "generation")
    pipe.hget(keys.progress(partition), "applied")
    if wanted:
        pipe.hmget(keys.state(partition), wanted)
    replies = pipe.execute()
    generation = None if replies[0] is None else int(replies[0])
    applied = NOTHING if replies[1] is None else int(replies[1])
    states = dict(zip(wanted, replies[2], strict=True)) if wanted else {}
    return Loaded(generation, applied, states)


@dataclass(frozen=True)
class CommitTarget:
    """Where a batch commits, and what must hold for it to commit."""

    keys: Keys
    generation: int
    partition: int
    after_epoch: int  # the partition must have applied exactly this far
    last_epoch: int  # names the stored batch (deleted by the commit)


def commit(
    r: Redis, target: CommitTarget, applied: AppliedBatch, notice: bytes = b""
) -> CommitOutcome:
    """Commit a batch's effects atomically, or nothing if it is stale, a duplicate or early.

    ``notice`` (if any) is appended to the run's notice stream in the same script.
    """
    keys, p = target.keys, target.partition
    sets: list[Any] = []
    deletes: list[str] = []
    for key, raw in applied.writes.items():
        if raw is None:
            deletes.append(key)
        else:
            sets += (key, raw)
    outcome = commit_batch(
        r,
        [
            keys.meta,
            keys.progress(p),
            keys.state(p),
            keys.undo(p),
            keys.notices(target.generation),
            keys.batch(target.generation, p, target.last_epoch),
        ],
        [
            target.generation,
            target.after_epoch,
            applied.applied_through,
            encode_undo(applied.undo) if applied.undo else b"",
            notice,
            len(sets) // 2,
            *sets,
            *deletes,
        ],
    )
    logger.debug(
        "partition %d epochs %d..%d: %s",
        p,
        target.after_epoch + 1,
        applied.applied_through,
        outcome.name,
    )
    return outcome


def applied_epochs(r: Redis, keys: Keys, partitions: int) -> list[int]:
    """The epoch through which each partition has applied its events."""
    pipe = r.pipeline(transaction=False)
    for p in range(partitions):
        pipe.hget(keys.progress(p), "applied")
    return [NOTHING if v is None else int(v) for v in pipe.execute()]


def restore_partition(r: Redis, keys: Keys, partition: int, epoch: int) -> int:
    """Restore a partition's state as it was at the end of ``epoch``.

    Each key touched after ``epoch`` gets the before-image of its first event
    after ``epoch`` (or loses its state if it had none); undo records after
    ``epoch`` are dropped. Call it only while no batch can commit (the caller
    has bumped the generation first).

    Returns:
        The number of keys restored.
    """
    applied = r.hget(keys.progress(partition), "applied")
    if applied is None or int(applied) <= epoch:
        return 0
    records = r.zrangebyscore(keys.undo(partition), f"({epoch}", "+inf", withscores=True)
    restore: dict[str, Any] = {}  # key -> its state (a JSON value) or None
    # Walk backwards so that the earliest event after `epoch` wins for each key.
    for member, _score in reversed(records):
        for e, key, before in reversed(orjson.loads(member)):
            if e > epoch:
                restore[key] = before
    # Only the oldest record can straddle `epoch`: keep its part up to `epoch`.
    kept = [entry for entry in orjson.loads(records[0][0]) if entry[0] <= epoch] if records else []
    pipe = r.pipeline(transaction=True)
    sets = [
        x
        for key, before in restore.items()
        if before is not None
        for x in (key, orjson.dumps(before))
    ]
    deletes = [key for key, before in restore.items() if before is None]
    for i in range(0, len(sets), 2000):
        pipe.hset(keys.state(partition), items=sets[i : i + 2000])
    for i in range(0, len(deletes), 1000):
        pipe.hdel(keys.state(partition), *deletes[i : i + 1000])
    pipe.zremrangebyscore(keys.undo(partition), f"({epoch}", "+inf")
    if kept:
        pipe.zadd(keys.undo(partition), {orjson.dumps(kept): epoch})
    pipe.hset(keys.progress(partition), "applied", epoch)
    pipe.execute()
    logger.info(
        "partition %d restored to epoch %d (%d keys, was %s)",
        partition,
        epoch,
        len(restore),
        applied.decode(),
    )
    return len(restore)
