"""RQ entry points: a few lines each that wire load -> apply -> commit."""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from dataclasses import replace
from typing import Any

import orjson
from redis import Redis

from tasks import metrics
from tasks.apply import AppliedBatch, apply_events
from tasks.batch import Batch, CommitNotice, Rejection
from tasks.careful import CarefulRun, ProbingIterator
from tasks.errors import CommitTooLarge, OutOfOrder
from tasks.flow import Dataflow, load_flow, make_router
from tasks.keys import Keys, partition_of
from tasks.lease import Lease, partition_lease
from tasks.store import CommitOutcome, CommitTarget, outcome_of, partition_transaction
from tasks.tuning import commit_bytes
from tasks.undo import Raw
from tasks.watchdog import EventWatch

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3
# The longest argument Redis takes (its proto-max-bulk-len, 512 MB by default): a larger one
# makes it drop the connection.
REDIS_MAX_ARGUMENT = 512 << 20
MB = 1 << 20


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
    except Exception:
        if metrics.WORKER is not None:
            metrics.WORKER.failures.inc(1, (namespace,))
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
            if len(routed) == 1 or partition_of(key, batch.partitions) == batch.partition:
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

    Each part ends with an epoch, and commits like a whole batch (WATCH of the
    partition's progress, MULTI/EXEC), its notice included, but keeps the stored
    batch, the lease and the staged next batch: only the last part releases them.
    The next part starts from the states this one committed, under a new WATCH
    (reloaded if the progress moved). A part committed by an earlier attempt of
    the batch (its worker died after it) is not run again: the batch goes on
    after it.
    """
    poison: dict[int, Rejection] | None = None if careful is not None else {}
    # (at most half of what Redis takes: a part over that limit is then one epoch's doing)
    max_bytes = min(commit_bytes(), REDIS_MAX_ARGUMENT // 2)
    epochs = [epoch for epoch, _, _ in events]
    after, start = batch.after_epoch, 0  # the epoch committed last, the first event after it
    states: dict[str, Raw] | None = None  # as this job's last part left them
    rejected = 0
    # A commit fails only when the partition's progress changed after the load; the
    # new progress then says why. Should it say nothing (it changed and came back),
    # the part is loaded and applied again.
    failures = 0
    while True:
        with partition_transaction(r, keys, batch.partition) as txn:
            loaded = txn.load([] if states is not None else wanted)
            current = states
            if current is None or (loaded.generation, loaded.applied) != (batch.generation, after):
                if current is not None:
                    loaded = txn.load(wanted)
                current = loaded.states
                gone_on = loaded.applied
                if loaded.generation == batch.generation and after < gone_on < batch.last_epoch:
                    # an earlier attempt committed the batch this far: go on after it
                    after, start, failures = gone_on, bisect_right(epochs, gone_on), 0
            part_target = replace(target, after_epoch=after)
            refused = outcome_of(part_target, loaded.generation, loaded.applied)
            if refused is CommitOutcome.OUT_OF_ORDER:
                raise _out_of_order(batch, after, loaded.applied)
            if refused is not None:
                return _result(batch, refused)
            if poison is None:  # (a copy of the batch that cannot commit leaves the probe alone)
                assert careful is not None
                poison = careful.start(events)
            applied = _apply(batch, flow, events, start, after, current, careful, poison, lease,
                             max_bytes)  # fmt: skip
            notice = CommitNotice.encode_outputs(
                batch.partition,
                applied.applied_through,
                applied.out_epochs,
                applied.out_items,
                applied.rejected,
                applied.failed,
            )
            _check_size(batch, after, applied, notice)
            started = time.perf_counter()
            outcome = txn.commit(replace(part_target, part=applied.more), applied, notice)
            if metrics.WORKER is not None:
                took = time.perf_counter() - started
                metrics.WORKER.commit_seconds.observe(took, (batch.namespace,))
        if outcome is CommitOutcome.COMMITTED:
            rejected += len(applied.rejected) + (applied.failed is not None)
            if not applied.more:
                return _result(batch, outcome, events=len(events), rejected=rejected)
            states = current  # (a dict of this job's own: apply_events copies it)
            states.update(applied.writes)
            after, failures = applied.applied_through, 0
            start = bisect_right(epochs, after)
            continue
        if outcome is not CommitOutcome.OUT_OF_ORDER:
            rejected += len(applied.rejected) + (applied.failed is not None)
            return _result(batch, outcome, events=len(events), rejected=rejected)
        failures += 1
        if failures >= COMMIT_ATTEMPTS:
            raise _out_of_order(batch, after, None)
        states = None


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
    return OutOfOrder(msg)


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
