"""RQ entry points: a few lines each that wire load -> apply -> commit."""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis

from tasks.apply import apply_events
from tasks.batch import Batch
from tasks.errors import OutOfOrder
from tasks.flow import load_flow
from tasks.keys import Keys
from tasks.lease import partition_lease
from tasks.scripts import CommitOutcome
from tasks.store import commit, load_for_batch

logger = logging.getLogger(__name__)


def process_batch(payload: str) -> dict[str, Any]:
    """RQ job: apply one batch of a partition and commit it (see ``run_batch``)."""
    from rq import get_current_job  # imported here: tests call run_batch without RQ

    job = get_current_job()
    assert job is not None, "process_batch runs inside an RQ job"
    batch = Batch.decode(payload)
    with partition_lease(job.connection, Keys(batch.namespace).lease(batch.partition), job.id):
        return run_batch(job.connection, batch)


def run_batch(r: Redis, batch: Batch) -> dict[str, Any]:
    """Apply a batch against the committed state and commit its effects atomically.

    Safe to run any number of times: a batch already committed, or sent by a
    superseded driver run, changes nothing.

    Raises:
        OutOfOrder: the partition has not committed the batch before this one.
    """
    loaded = load_for_batch(r, batch)
    if loaded.generation != batch.generation:
        return _result(batch, CommitOutcome.STALE)
    if loaded.applied >= batch.last_epoch:
        return _result(batch, CommitOutcome.DUPLICATE)
    if loaded.applied != batch.after_epoch:
        raise _out_of_order(batch, loaded.applied)
    flow = load_flow(batch.flow)
    applied = apply_events(flow, batch.events, loaded.states, batch.last_epoch, batch.on_error)
    outcome = commit(r, batch, applied)
    if outcome is CommitOutcome.OUT_OF_ORDER:
        raise _out_of_order(batch, None)
    return _result(batch, outcome)


def _out_of_order(batch: Batch, applied: int | None) -> OutOfOrder:
    seen = "changed while the batch ran" if applied is None else f"is at epoch {applied}"
    msg = (
        f"partition {batch.partition} {seen}, but batch {batch.after_epoch + 1}.."
        f"{batch.last_epoch} needs it at epoch {batch.after_epoch}"
    )
    return OutOfOrder(msg)


def _result(batch: Batch, outcome: CommitOutcome) -> dict[str, Any]:
    return {
        "partition": batch.partition,
        "last_epoch": batch.last_epoch,
        "events": len(batch.events),
        "outcome": outcome.name.lower(),
    }
