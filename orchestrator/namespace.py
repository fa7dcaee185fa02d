"""The namespace's stored facts (partitions, flow, committed epoch) and what a run does to them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from tasks.errors import NamespaceError
from tasks.keys import Keys
from tasks.store import NOTHING, restore_partition

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamespaceInfo:
    """What the namespace's meta hash says."""

    partitions: int | None
    flow: str | None
    generation: int
    committed: int  # the last committed epoch, or -1
    offset: int  # byte offset in the input of line committed + 1
    input: str | None

    @property
    def exists(self) -> bool:
        """Whether a run has ever started on the namespace."""
        return self.partitions is not None


def read_info(r: Redis, keys: Keys) -> NamespaceInfo:
    """Read the namespace's meta hash (one round trip)."""
    meta = {k.decode(): v.decode() for k, v in r.hgetall(keys.meta).items()}
    return NamespaceInfo(
        partitions=int(meta["partitions"]) if "partitions" in meta else None,
        flow=meta.get("flow"),
        generation=int(meta.get("generation", 0)),
        committed=int(meta.get("committed", NOTHING)),
        offset=int(meta.get("offset", 0)),
        input=meta.get("input"),
    )


def check_compatible(info: NamespaceInfo, partitions: int | None, flow: str | None) -> int:
    """Return the partition count to use; refuse options that contradict the stored ones.

    Raises:
        NamespaceError: a different partition count or flow than the namespace was created with.
    """
    if info.partitions is None:
        return partitions or 4
    if partitions is not None and partitions != info.partitions:
        msg = (
            f"--partitions {partitions} does not match the namespace's {info.partitions} "
            f"(fixed at its first ingest); drop the option, or 'reset --yes' to start over"
        )
        raise NamespaceError(msg)
    if flow is not None and info.flow is not None and info.flow != flow:
        msg = (
            f"--flow {flow} does not match the namespace's flow {info.flow}; "
            f"use a different --namespace, or 'reset --yes' to start over"
        )
        raise NamespaceError(msg)
    return info.partitions


def start_run(
    r: Redis,
    keys: Keys,
    *,
    partitions: int,
    flow: str,
    input_name: str,
    start_epoch: int,
    start_offset: int,
) -> int:
    """Take over the namespace for a run that processes input from ``start_epoch`` on.

    Bumps the generation first, so that batches of an earlier (killed) run can
    no longer commit; then restores every partition as of ``start_epoch - 1``,
    which discards anything committed after it, and drops stale jobs and notices.

    Returns:
        The run's generation.
    """
    generation = int(r.hincrby(keys.meta, "generation", 1))
    r.hset(keys.meta, mapping={"partitions": partitions, "flow": flow, "input": input_name})
    for p in range(partitions):
        restore_partition(r, keys, p, start_epoch - 1)
    for name in keys.queue_names(partitions):
        Queue(name, connection=r, serializer=JSONSerializer).empty()
    stale = [k for k in r.scan_iter(match=keys.notices_pattern, count=1000)]
    pipe = r.pipeline(transaction=True)
    if stale:
        pipe.delete(*stale)
    pipe.zremrangebyscore(keys.checkpoints, f"({start_epoch}", "+inf")
    pipe.execute()
    record_commit(r, keys, start_epoch - 1, start_offset)
    logger.info("generation %d starts at epoch %d (byte %d)", generation, start_epoch, start_offset)
    return generation


def record_commit(r: Redis, keys: Keys, committed: int, offset: int) -> None:
    """Record the namespace's committed epoch and where the next line starts (one round trip)."""
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.meta, mapping={"committed": committed, "offset": offset, "at": time.time()})
    pipe.zadd(keys.checkpoints, {f"{committed + 1}:{offset}": committed + 1})
    pipe.execute()


def checkpoint_at_or_before(r: Redis, keys: Keys, epoch: int) -> tuple[int, int]:
    """The nearest recorded (epoch, byte offset) at or before ``epoch``; (0, 0) if none."""
    found = r.zrevrangebyscore(keys.checkpoints, epoch, "-inf", start=0, num=1)
    if not found:
        return 0, 0
    e, offset = found[0].decode().split(":")
    return int(e), int(offset)


def reset(r: Redis, keys: Keys) -> int:
    """Delete every key of the namespace, its RQ queues and its RQ jobs.

    Returns:
        The number of keys deleted.
    """
    patterns = [
        keys.pattern,
        f"rq:queue:{keys.namespace}-p*",
        f"rq:*:{keys.namespace}-p*",
        f"rq:job:{keys.job_id_prefix}*",
        f"rq:results:{keys.job_id_prefix}*",
        f"rq:executions:{keys.job_id_prefix}*",
    ]
    deleted = 0
    for pattern in patterns:
        batch: list[bytes] = []
        for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(r.delete(*batch))
                batch = []
        if batch:
            deleted += int(r.delete(*batch))
    return deleted


def require_committed(info: NamespaceInfo, keys: Keys) -> None:
    """Refuse a command that needs committed epochs on an empty namespace."""
    if info.committed == NOTHING:
        msg = (
            f"namespace {keys.namespace!r} has no committed epochs; run 'orchestrator ingest FILE'"
        )
        raise NamespaceError(msg)
