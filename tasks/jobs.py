"""RQ entry points: a few lines each that wire load -> apply -> commit."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from redis import Redis

from tasks import metrics
from tasks.apply import AppliedBatch, apply_events
from tasks.batch import Batch, CommitNotice, Rejection
from tasks.careful import CarefulRun, ProbingIterator
from tasks.errors import OutOfOrder
from tasks.flow import Dataflow, load_flow, make_router
from tasks.keys import Keys, partition_of
from tasks.lease import Lease, partition_lease
from tasks.store import CommitOutcome, CommitTarget, Loaded, outcome_of, partition_transaction
from tasks.watchdog import EventWatch

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3


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
    poison: dict[int, Rejection] | None = None if careful is not None else {}
    # A commit fails only when the partition's progress changed after the load; the
    # new progress then says why. Should it say nothing (it changed and came back),
    # the batch is loaded and applied again.
    for _ in range(COMMIT_ATTEMPTS):
        with partition_transaction(r, keys, batch.partition) as txn:
            loaded = txn.load(wanted)
            refused = outcome_of(target, loaded.generation, loaded.applied)
            if refused is CommitOutcome.OUT_OF_ORDER:
                raise _out_of_order(batch, loaded.applied)
            if refused is not None:
                return _result(batch, refused)
            if poison is None:  # (a copy of the batch that cannot commit leaves the probe alone)
                assert careful is not None
                poison = careful.start(events)
            applied = _apply(batch, flow, events, loaded, careful, poison, lease)
            notice = CommitNotice.encode_outputs(
                batch.partition,
                applied.applied_through,
                applied.out_epochs,
                applied.out_items,
                applied.rejected,
                applied.failed,
            )
            started = time.perf_counter()
            outcome = txn.commit(target, applied, notice)
            if metrics.WORKER is not None:
                took = time.perf_counter() - started
                metrics.WORKER.commit_seconds.observe(took, (batch.namespace,))
        if outcome is not CommitOutcome.OUT_OF_ORDER:
            rejected = len(applied.rejected) + (applied.failed is not None)
            return _result(batch, outcome, events=len(events), rejected=rejected)
    raise _out_of_order(batch, None)


def _apply(
    batch: Batch,
    flow: Dataflow,
    events: list[tuple[int, str, Any]],
    loaded: Loaded,
    careful: CarefulRun | None,
    poison: dict[int, Rejection],
    lease: Lease | None,
) -> AppliedBatch:
    """Run the events through the flow under the batch timer, leaving out poison events."""
    last_epoch = batch.last_epoch
    run: Any = events
    if careful is not None:
        if poison and batch.on_error == "fail":  # the batch stops at the first poison event
            first = poison[min(poison)]
            last_epoch = first.epoch - 1
            events = [e for e in events if e[0] < first.epoch]
            poison = {min(poison): first}
        run = careful.events(events, poison)
    shielded = (ProbingIterator.__next__.__code__, CarefulRun.probe.__code__)
    on_tick = None if lease is None else lease.renew_if_late
    on_timeout = None if careful is None else careful.timed_out
    with EventWatch(
        batch.timeout, on_tick=on_tick, on_timeout=on_timeout, shielded=shielded
    ) as watch:
        applied = apply_events(flow, run, loaded.states, last_epoch, batch.on_error, watch=watch)
    if careful is None:
        return applied
    careful.probe(len(events), len(events))  # the flow is done: a death now is not an event's
    if batch.on_error == "fail":
        if poison and applied.failed is None:  # (an earlier event may have stopped it first)
            applied.failed = next(iter(poison.values()))
    elif poison:
        applied.rejected = sorted([*applied.rejected, *poison.values()], key=lambda x: x.epoch)
    return applied


def _out_of_order(batch: Batch, applied: int | None) -> OutOfOrder:
    seen = "changed while the batch ran" if applied is None else f"is at epoch {applied}"
    msg = (
        f"partition {batch.partition} {seen}, but batch {batch.after_epoch + 1}.."
        f"{batch.last_epoch} needs it at epoch {batch.after_epoch}"
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
