"""The namespace's stored facts (partitions, flow, committed epoch) and what a run does to them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from orchestrator.reader import fingerprint
from orchestrator.settings import DEFAULT_PARTITIONS
from tasks.errors import NamespaceError
from tasks.keys import Keys
from tasks.store import NOTHING, claim_partition, restore_partition

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
    output: str | None = None  # the --output file of the runs, if any
    output_length: int | None = None  # its length once the committed epochs are in it
    retained_from: int = 0  # the oldest epoch replay can start at
    read_epoch: int | None = None  # the last epoch the driver read
    events_per_s: float | None = None  # of the last run, as it went
    retain_epochs: int | None = None
    fingerprint: str | None = None  # of the input's first fingerprint_end bytes
    fingerprint_end: int = 0

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
        output=meta.get("output"),
        output_length=int(meta["output_length"]) if "output_length" in meta else None,
        retained_from=int(meta.get("retained_from", 0)),
        read_epoch=int(meta["read_epoch"]) if "read_epoch" in meta else None,
        events_per_s=float(meta["events_per_s"]) if "events_per_s" in meta else None,
        retain_epochs=int(meta["retain_epochs"]) if "retain_epochs" in meta else None,
        fingerprint=meta.get("fingerprint"),
        fingerprint_end=int(meta.get("fingerprint_end", 0)),
    )


def check_compatible(info: NamespaceInfo, partitions: int | None, flow: str | None) -> int:
    """Return the partition count to use; refuse options that contradict the stored ones.

    Raises:
        NamespaceError: a different partition count or flow than the namespace was created with.
    """
    if info.partitions is None:
        return partitions or DEFAULT_PARTITIONS
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
    output: str | None = None,
    output_length: int | None = None,
) -> int:
    """Take over the namespace for a run that processes input from ``start_epoch`` on.

    Bumps the generation and claims every partition for it first, so that
    batches of an earlier (killed) run can no longer commit; then restores every
    partition as of ``start_epoch - 1``, which discards anything committed after
    it, and drops stale jobs and notices.

    Returns:
        The run's generation.
    """
    generation = int(r.hincrby(keys.meta, "generation", 1))
    r.hset(keys.meta, mapping={"partitions": partitions, "flow": flow, "input": input_name})
    if output is None:
        r.hdel(keys.meta, "output", "output_length")
    else:
        r.hset(keys.meta, "output", output)
    pipe = r.pipeline(transaction=False)
    for p in range(partitions):
        claim_partition(pipe, keys, p, generation)
    pipe.execute()
    for p in range(partitions):
        restore_partition(r, keys, p, start_epoch - 1)
    queues = [
        Queue(name, connection=r, serializer=JSONSerializer)
        for name in keys.queue_names(partitions)
    ]
    for queue in queues:
        queue.empty()
    # Registered with RQ from the start, so that `rq info` lists every partition queue.
    r.sadd(Queue.redis_queues_keys, *[queue.key for queue in queues])
    stale = [k for k in r.scan_iter(match=keys.notices_pattern, count=1000)]
    stale += [k for k in r.scan_iter(match=keys.batches_pattern, count=1000)]
    stale += [k for k in r.scan_iter(match=keys.successors_pattern, count=1000)]
    pipe = r.pipeline(transaction=True)
    if stale:
        pipe.delete(*stale)
    pipe.zremrangebyscore(keys.checkpoints, f"({start_epoch}", "+inf")
    pipe.execute()
    drop_dead_letters_from(r, keys, start_epoch)
    Committer(r, keys, partitions).record(
        start_epoch - 1, start_offset, [], output_length=output_length
    )
    logger.info("generation %d starts at epoch %d (byte %d)", generation, start_epoch, start_offset)
    return generation


def drop_dead_letters_from(r: Redis, keys: Keys, epoch: int) -> int:
    """Delete dead letters of epochs >= ``epoch``: the run that starts there records them again."""
    doomed: list[bytes] = []
    last = "+"
    while True:
        page = r.xrevrange(keys.dead_letters, max=last, min="-", count=500)
        for entry_id, fields in page:
            if int(fields[b"epoch"]) < epoch:
                page = []
                break
            doomed.append(entry_id)
        if len(page) < 500:
            break
        last = f"({page[-1][0].decode()}"
    if doomed:
        r.xdel(keys.dead_letters, *doomed)
    return len(doomed)


class Committer:
    """Records the namespace's committed epoch, and what goes with it.

    One MULTI/EXEC per advance: the committed epoch and the input offset after
    it, a checkpoint for replay, the dead letters of the epochs it covers, and
    (at most once a second) a fingerprint of the input before that offset.
    Every few seconds it also drops undo records older than the retention window.
    """

    FINGERPRINT_EVERY = 1.0
    GC_EVERY = 5.0

    def __init__(
        self,
        r: Redis,
        keys: Keys,
        partitions: int,
        *,
        input_path: str | None = None,
        retain_epochs: int | None = None,
    ) -> None:
        self.r, self.keys, self.partitions = r, keys, partitions
        self.input_path = input_path
        self.retain_epochs = retain_epochs
        if retain_epochs is not None:
            r.hset(keys.meta, "retain_epochs", retain_epochs)
        self._fingerprinted_at = float("-inf")
        self._collected_at = time.monotonic()

    def record(
        self,
        committed: int,
        offset: int,
        dead: list[Any],
        *,
        output_length: int | None = None,
        progress: dict[str, Any] | None = None,
        final: bool = False,
    ) -> None:
        """Record that every epoch up to ``committed`` is committed and its output written.

        ``output_length`` is the length of the output file once those lines are in
        it (and synced): a resume truncates the file back to it.
        """
        now = time.monotonic()
        fields: dict[str, Any] = {"committed": committed, "offset": offset, "at": time.time()}
        if output_length is not None:
            fields["output_length"] = output_length
        backlog = None
        if progress is not None:  # for status: how far the driver read, how fast, what waits
            backlog = progress.pop("backlog")
            fields |= progress
        if self.input_path and (final or now - self._fingerprinted_at >= self.FINGERPRINT_EVERY):
            with open(self.input_path, "rb") as f:
                fields |= {"fingerprint": fingerprint(f, offset), "fingerprint_end": offset}
            self._fingerprinted_at = now
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.meta, mapping=fields)
        if backlog is not None:
            pipe.delete(self.keys.backlog)
            if backlog:
                pipe.hset(self.keys.backlog, mapping=backlog)
        checkpoint = Checkpoint(committed + 1, offset, output_length)
        pipe.zadd(self.keys.checkpoints, {checkpoint.member: committed + 1})
        for bad in dead:
            pipe.xadd(
                self.keys.dead_letters,
                {
                    "epoch": bad.epoch,
                    "line": bad.line_number,
                    "input": self.input_path or "",
                    "reason": bad.reason,
                    "raw": bad.raw,
                },
            )
        pipe.execute()
        if self.retain_epochs is not None and (final or now - self._collected_at >= self.GC_EVERY):
            self._collected_at = now
            collect_garbage(self.r, self.keys, self.partitions, committed, self.retain_epochs)


def collect_garbage(r: Redis, keys: Keys, partitions: int, committed: int, retain: int) -> int:
    """Drop undo records and checkpoints that only serve replays older than the window.

    The current state of every key is kept whatever its age (it is in the state
    hash, not in the undo records); only the history before ``committed + 1 -
    retain`` goes, and replay from before that epoch is then refused.

    Returns:
        The oldest epoch replay can start at.
    """
    retained_from = max(0, committed + 1 - retain)
    floor = checkpoint_at_or_before(r, keys, retained_from).epoch
    pipe = r.pipeline(transaction=True)
    for p in range(partitions):
        pipe.zremrangebyscore(keys.undo(p), "-inf", f"({retained_from}")
    pipe.zremrangebyscore(keys.checkpoints, "-inf", f"({floor}")
    pipe.hset(keys.meta, "retained_from", retained_from)
    pipe.execute()
    return retained_from


@dataclass(frozen=True)
class Checkpoint:
    """Where epoch ``epoch`` starts: its byte offset in the input and in the output file."""

    epoch: int
    offset: int
    output_length: int | None  # None: no output file was recorded

    @property
    def member(self) -> str:
        """Its member in the checkpoints sorted set (scored by epoch)."""
        out = -1 if self.output_length is None else self.output_length
        return f"{self.epoch}:{self.offset}:{out}"


def checkpoint_at_or_before(r: Redis, keys: Keys, epoch: int) -> Checkpoint:
    """The nearest recorded checkpoint at or before ``epoch`` (the start of the input if none)."""
    found = r.zrevrangebyscore(keys.checkpoints, epoch, "-inf", start=0, num=1)
    if not found:
        return Checkpoint(0, 0, 0)
    e, offset, out = found[0].decode().split(":")
    return Checkpoint(int(e), int(offset), None if int(out) < 0 else int(out))


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
    # RQ's set of all queues is shared: only this namespace's queues leave it.
    queues = list(r.sscan_iter(Queue.redis_queues_keys, match=f"rq:queue:{keys.namespace}-p*"))
    if queues:
        r.srem(Queue.redis_queues_keys, *queues)
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
