"""RQ entry points: a few lines each that wire load -> apply -> commit."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from bisect import bisect_right
from dataclasses import replace
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import RedisError

from tasks import metrics
from tasks.apply import AppliedBatch, apply_events
from tasks.batch import Batch, CommitNotice, Rejection
from tasks.careful import CarefulRun, ProbingIterator
from tasks.errors import CommitTooLarge, OutOfOrder
from tasks.flow import Dataflow, load_flow, make_router
from tasks.keys import PARTITION_FOUND_AT, Keys, partition_of
from tasks.lease import Lease, partition_lease
from tasks.store import (
    CommitOutcome,
    CommitTarget,
    PartitionTransaction,
    outcome_of,
    partition_transaction,
)
from tasks.tuning import commit_bytes
from tasks.undo import Raw
from tasks.watchdog import EventWatch

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3
# The longest argument Redis takes (its proto-max-bulk-len, 512 MB by default): a larger one
# makes it drop the connection.
REDIS_MAX_ARGUMENT = 512 << 20
MB = 1 << 20


def part_bytes() -> int:
    """The bytes after which a commit ends at the next epoch: ``commit_bytes``, at most half
    of what Redis takes in one argument (a part over that limit is then one epoch's doing)."""
    return min(commit_bytes(), REDIS_MAX_ARGUMENT // 2)


def process_batch(
    namespace: str, partition: int, batch_key: str, attempt: int = 1
) -> dict[str, Any]:
    """RQ job: apply one stored batch of a partition and commit it (see ``run_batch``).

    The job carries only where the batch is, and which attempt this is (the
    driver sends a batch again when its worker died): its lines are stored in
    Redis as they were read, so RQ neither compresses nor JSON-escapes them.
    """
    from rq import get_current_job  # imported here: tests call run_batch without RQ

    job = get_current_job()
    assert job is not None, "process_batch runs inside an RQ job"
    r = job.connection
    started = time.perf_counter()
    try:
        with partition_lease(r, Keys(namespace).lease(partition), job.id, fetch=batch_key) as lease:
            payload = lease.fetched
            if payload is None:  # committed already (its commit deleted it), or a stale run's
                result = {"partition": partition, "batch": batch_key, "outcome": "gone"}
            else:
                result = run_batch(r, Batch.decode(payload), attempt=attempt, lease=lease)
    except Exception as error:
        if metrics.WORKER is not None:
            metrics.WORKER.failures.inc(1, (namespace,))
        if isinstance(error, OutOfOrder) and error.applied is not None:
            # For the driver, which tells a partition that went back in time from a bug.
            with contextlib.suppress(RedisError):
                job.meta[PARTITION_FOUND_AT] = error.applied
                job.save_meta()
        raise
    if metrics.WORKER is not None:
        _count(metrics.WORKER, namespace, result, time.perf_counter() - started)
    return result


def _count(m: metrics.WorkerMetrics, namespace: str, result: dict[str, Any], took: float) -> None:
    """Count one batch job in the worker's metrics (served with ``--metrics-port``)."""
    ns = (namespace,)
    m.batches.inc(1, (namespace, result["outcome"]))
    if result["outcome"] == "committed":
        m.events.inc(result["events"], ns)
        m.rejected.inc(result["rejected"], ns)
    m.apply_seconds.observe(took, ns)


def batch_events(batch: Batch) -> list[tuple[int, str, Any]]:
    """The batch's events: its lines parsed and routed again, keeping this partition's keys.

    The driver validated and routed these lines already; the flow's first steps
    are deterministic, so they give the same events here. A line they reject
    now gives no event.
    """
    before, stateful, _ = load_flow(batch.flow).split()
    route, loads = make_router(before, stateful), orjson.loads
    events = []
    for epoch, line in zip(batch.epochs, batch.lines, strict=True):
        try:
            routed = route(loads(line))
        except Exception:  # noqa: S112 - the driver decided this line already
            continue
        for key, value in routed:
            # One event per line (the common case) is this partition's: the driver sent it here.
            if (
                len(routed) == 1
                or partition_of(key, batch.partitions, batch.slots) == batch.partition
            ):
                events.append((epoch, key, value))
    return events


def run_batch(
    r: Redis, batch: Batch, *, attempt: int = 1, lease: Lease | None = None
) -> dict[str, Any]:
    """Apply a batch against the committed state and commit its effects atomically.

    Safe to run any number of times: a batch already committed, or sent by a
    superseded driver run, changes nothing. An event the flow runs on for longer
    than ``batch.timeout`` is rejected as timed out (``tasks/watchdog.py``); from
    the second attempt on, the batch runs carefully (``tasks/careful.py``).

    Raises:
        OutOfOrder: the partition has not committed the batch before this one.
    """
    keys = Keys(batch.namespace)
    events = batch_events(batch)
    target = CommitTarget(
        keys,
        batch.generation,
        batch.partition,
        batch.after_epoch,
        batch.last_epoch,
        job=True,
    )
    wanted = list(dict.fromkeys(key for _, key, _ in events))
    flow = load_flow(batch.flow)
    careful = CarefulRun(r, keys, batch, attempt) if attempt > 1 else None
    try:
        return _apply_and_commit(r, batch, keys, target, flow, events, wanted, careful, lease)
    finally:
        if careful is not None:
            careful.finish()


def _apply_and_commit(
    r: Redis,
    batch: Batch,
    keys: Keys,
    target: CommitTarget,
    flow: Dataflow,
    events: list[tuple[int, str, Any]],
    wanted: list[str],
    careful: CarefulRun | None,
    lease: Lease | None,
) -> dict[str, Any]:
    """Apply and commit the batch, in parts bounded by bytes (``commit_bytes``).

    Each part ends with an epoch, and commits like a whole batch (MULTI/EXEC under
    WATCH of the partition's progress), its notice included, but keeps the stored
    batch, the lease and the staged next batch: only the last part releases them.
    A part commits in the background while the next one is applied, from the
    states it commits; that one commits only if the progress is still where the
    part before it left it (checked under its own WATCH), else it is dropped and
    the batch goes on from a fresh load. A part committed by an earlier attempt of
    the batch (its worker died after it) is not run again: the batch goes on after it.
    """
    part = _Parts(batch, flow, events, careful, lease)
    after = batch.after_epoch  # the epoch this job saw committed last
    rejected = 0
    # A commit fails only when the partition's progress changed after the load; the
    # new progress then says why. Should it say nothing (it changed and came back),
    # the part is loaded and applied again.
    failures = 0
    while True:
        context = partition_transaction(r, keys, batch.partition)
        txn = context.__enter__()
        commit: _Commit | None = None  # (which ends the transaction once it has committed)
        try:
            loaded = txn.load(wanted)
            gone_on = loaded.applied
            if loaded.generation == batch.generation and after < gone_on < batch.last_epoch:
                # an earlier attempt committed the batch this far: go on after it
                after, failures = gone_on, 0
            part_target = replace(target, after_epoch=after)
            refused = outcome_of(part_target, loaded.generation, loaded.applied)
            if refused is CommitOutcome.OUT_OF_ORDER:
                raise _out_of_order(batch, after, loaded.applied)
            if refused is not None:
                return _result(batch, refused)
            if part.poison is None:  # (a copy that cannot commit leaves the probe alone)
                assert careful is not None
                part.poison = careful.start(events)
            states = loaded.states
            applied, notice = part.apply(part.first_after(after), after, states)
            commit = _Commit(r, keys, part_target, applied, notice, (context, txn))
        finally:
            if commit is None:
                context.__exit__(None, None, None)
        while True:  # the parts that follow, each applied while the one before it commits
            if not applied.more:
                outcome = commit.outcome()
                break
            states.update(applied.writes)  # (its own dict: apply_events copies it)
            after = applied.applied_through
            try:
                next_applied, next_notice = part.apply(part.first_after(after), after, states)
            finally:
                outcome = commit.outcome()  # (waited for, whatever happens)
            if outcome is not CommitOutcome.COMMITTED:
                after = part_target.after_epoch
                break
            rejected += len(applied.rejected)
            part_target = replace(target, after_epoch=after)
            applied, notice = next_applied, next_notice
            commit = _Commit(r, keys, part_target, applied, notice)
        if outcome is CommitOutcome.COMMITTED:  # (the last part)
            rejected += len(applied.rejected) + (applied.failed is not None)
            return _result(batch, outcome, events=len(events), rejected=rejected)
        if outcome is not CommitOutcome.OUT_OF_ORDER:
            rejected += len(applied.rejected) + (applied.failed is not None)
            return _result(batch, outcome, events=len(events), rejected=rejected)
        failures += 1
        if failures >= COMMIT_ATTEMPTS:
            raise _out_of_order(batch, after, None)


class _Parts:
    """What applies the parts of one batch: the flow, the events, the bound on bytes."""

    def __init__(
        self,
        batch: Batch,
        flow: Dataflow,
        events: list[tuple[int, str, Any]],
        careful: CarefulRun | None,
        lease: Lease | None,
    ) -> None:
        self.batch, self.flow, self.events, self.careful, self.lease = (
            batch, flow, events, careful, lease
        )  # fmt: skip
        self.epochs = [epoch for epoch, _, _ in events]
        self.poison: dict[int, Rejection] | None = None if careful is not None else {}
        self.max_bytes = part_bytes()

    def first_after(self, epoch: int) -> int:
        """The index of the first event after ``epoch``."""
        return bisect_right(self.epochs, epoch)

    def apply(self, start: int, after: int, states: dict[str, Raw]) -> tuple[AppliedBatch, bytes]:
        """Apply the next part, from event ``start`` on; with its notice, checked for size."""
        assert self.poison is not None
        b = self.batch
        applied = _apply(b, self.flow, self.events, start, after, states, self.careful,
                         self.poison, self.lease, self.max_bytes)  # fmt: skip
        notice = CommitNotice.encode_outputs(
            b.partition,
            applied.applied_through,
            applied.out_epochs,
            applied.out_items,
            applied.rejected,
            applied.failed,
        )
        _check_size(b, after, applied, notice)
        return applied, notice


class _Commit:
    """One part's commit, run in a thread of its own while the next part is applied.

    Given the transaction its states were loaded in, it commits there; else it
    takes a WATCH of its own, and commits only if the progress is still at the
    part's ``after_epoch`` (the part before it, committed by this job): the states
    are then the ones it was applied to.
    """

    def __init__(
        self,
        r: Redis,
        keys: Keys,
        target: CommitTarget,
        applied: AppliedBatch,
        notice: bytes,
        loaded_in: tuple[Any, PartitionTransaction] | None = None,
    ) -> None:
        self.r, self.keys, self.target = r, keys, replace(target, part=applied.more)
        self.applied, self.notice, self.loaded_in = applied, notice, loaded_in
        self._outcome: CommitOutcome | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.loaded_in is not None:
                context, txn = self.loaded_in
                try:
                    self._outcome = self._commit(txn)
                finally:
                    context.__exit__(None, None, None)
                return
            with partition_transaction(self.r, self.keys, self.target.partition) as txn:
                loaded = txn.load([])
                refused = outcome_of(self.target, loaded.generation, loaded.applied)
                self._outcome = refused if refused is not None else self._commit(txn)
        except BaseException as e:  # noqa: BLE001 - raised again by outcome()
            self._error = e

    def _commit(self, txn: PartitionTransaction) -> CommitOutcome:
        started = time.perf_counter()
        outcome = txn.commit(self.target, self.applied, self.notice)
        if metrics.WORKER is not None:
            took = time.perf_counter() - started
            metrics.WORKER.commit_seconds.observe(took, (self.target.keys.namespace,))
        return outcome

    def outcome(self) -> CommitOutcome:
        """Wait for the commit; its outcome, or what it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


def _apply(
    batch: Batch,
    flow: Dataflow,
    events: list[tuple[int, str, Any]],
    start: int,
    after: int,
    states: dict[str, Raw],
    careful: CarefulRun | None,
    poison: dict[int, Rejection],
    lease: Lease | None,
    max_bytes: int,
) -> AppliedBatch:
    """Run the events from ``start`` on (the first after epoch ``after``) through the flow
    under the batch timer, leaving out poison events, up to ``max_bytes`` of commit."""
    last_epoch = batch.last_epoch
    run: Any = events[start:] if start else events
    if careful is not None:
        poison = {i: x for i, x in poison.items() if i >= start}
        if poison and batch.on_error == "fail":  # the batch stops at the first poison event
            first = poison[min(poison)]
            last_epoch = first.epoch - 1
            events = [e for e in events if e[0] < first.epoch]
            poison = {min(poison): first}
        run = careful.events(events, poison, start)
    shielded = (ProbingIterator.__next__.__code__, CarefulRun.probe.__code__)
    on_tick = None if lease is None else lease.renew_if_late
    on_timeout = None if careful is None else careful.timed_out
    with EventWatch(
        batch.timeout, on_tick=on_tick, on_timeout=on_timeout, shielded=shielded
    ) as watch:
        applied = apply_events(
            flow, run, states, last_epoch, batch.on_error, watch=watch, max_bytes=max_bytes
        )
    if careful is None:
        return applied
    careful.probe(len(events), len(events))  # the flow is done: a death now is not an event's
    if batch.on_error == "fail":
        # (an earlier event may have stopped it first, or the bound before the poison event)
        if poison and applied.failed is None and not applied.more:
            applied.failed = next(iter(poison.values()))
    elif poison:
        through = applied.applied_through
        mine = [x for x in poison.values() if after < x.epoch <= through]
        applied.rejected = sorted([*applied.rejected, *mine], key=lambda x: x.epoch)
    return applied


def _check_size(batch: Batch, after: int, applied: AppliedBatch, notice: bytes) -> None:
    """Refuse a commit that Redis would refuse: an argument over ``REDIS_MAX_ARGUMENT``.

    Redis drops the connection on such an argument, which redis-py reports under
    WATCH as a ``WatchError``: without this check the commit looked refused as if
    the partition had changed, and was tried again forever. A part is bounded by
    ``commit_bytes`` (at most half the limit) plus its last epoch, so only one
    epoch's output, state or undo images can bring it there.

    Raises:
        CommitTooLarge: naming the partition, the epochs and the limit.
    """
    # Under the limit for sure (undo <= carried + one byte per IMAGE step, a state <= carried):
    # the sums below cost a worker ~0.1 us an event.
    bound = applied.carried + len(applied.undo_steps)
    if bound < REDIS_MAX_ARGUMENT and len(notice) < REDIS_MAX_ARGUMENT:
        return
    undo = sum(len(x) for x in applied.undo_images if x is not None)
    undo += sum(map(len, applied.undo_steps))
    state = max((len(x) for x in applied.writes.values() if x is not None), default=0)
    size, what = max((len(notice), "its output lines"), (undo, "its undo record"),
                     (state, "one state"))  # fmt: skip
    if size < REDIS_MAX_ARGUMENT:
        return
    last = applied.applied_through
    alone = sum(len(x) for e, x in applied.outputs if e == last)
    msg = (
        f"partition {batch.partition} epochs {after + 1}..{last}: {what} take "
        f"{size / MB:.1f} MB (the output lines of epoch {last} alone {alone / MB:.1f} MB), "
        f"more than Redis takes in one argument (proto-max-bulk-len, "
        f"{REDIS_MAX_ARGUMENT / MB:g} MB by default); a commit is cut only between epochs"
    )
    raise CommitTooLarge(msg)


def _out_of_order(batch: Batch, after: int, applied: int | None) -> OutOfOrder:
    seen = "changed while the batch ran" if applied is None else f"is at epoch {applied}"
    msg = (
        f"partition {batch.partition} {seen}, but batch {batch.after_epoch + 1}.."
        f"{batch.last_epoch} needs it at epoch {after}"
    )
    return OutOfOrder(msg, applied)


def _result(
    batch: Batch, outcome: CommitOutcome, *, events: int = 0, rejected: int = 0
) -> dict[str, Any]:
    return {
        "partition": batch.partition,
        "last_epoch": batch.last_epoch,
        "lines": len(batch.lines),
        "outcome": outcome.name.lower(),
        "events": events,  # (those the batch applied, when it committed)
        "rejected": rejected,
    }
